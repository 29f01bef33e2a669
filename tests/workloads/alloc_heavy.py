"""Allocation-heavy: ROUNDS rounds of building and dropping the structures a
service allocates: small objects (tuples, dicts, floats, short strings),
lists that grow past pymalloc's 512 bytes, and larger strings and bytes.

Prints `elapsed_seconds cpu_seconds`.
"""
import argparse
import time


def records(n):
    return [{"id": i, "name": f"user-{i}", "score": i * 0.5, "tags": (i, i + 1)} for i in range(n)]


def render(rows):
    return "\n".join(f"{row['id']},{row['name']},{row['score']}" for row in rows)


def chunks(text):
    data = text.encode()
    return [data[i : i + 4096] for i in range(0, len(data), 4096)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    for _ in range(args.rounds):
        rows = records(20_000)
        text = render(rows)
        parts = chunks(text)
        del rows, text, parts
    print(f"{time.perf_counter() - start:.6f} {time.process_time():.6f}", flush=True)


if __name__ == "__main__":
    main()
