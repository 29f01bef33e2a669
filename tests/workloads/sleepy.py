"""Sleep-heavy, like a lightly loaded service: ROUNDS times, a little work
(about 50 us) then a 0.5 ms sleep, so the thread leaves the CPU 2,000 times a
second.

Prints `elapsed_seconds cpu_seconds`.
"""
import argparse
import time


def work():
    return sum(i * i for i in range(300))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    for _ in range(args.rounds):
        work()
        time.sleep(0.0005)
    print(f"{time.perf_counter() - start:.6f} {time.process_time():.6f}", flush=True)


if __name__ == "__main__":
    main()
