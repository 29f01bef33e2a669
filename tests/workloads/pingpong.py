"""Switch-heavy: two threads pass one byte back and forth through two pipes
ROUNDS times, so that each blocks and wakes ROUNDS times.

Prints `elapsed_seconds cpu_seconds`.
"""
import argparse
import os
import threading
import time


def player(read_fd, write_fd, rounds, serve):
    if serve:
        os.write(write_fd, b"x")
    for _ in range(rounds):
        os.read(read_fd, 1)
        os.write(write_fd, b"x")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args()
    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    start = time.perf_counter()
    threads = [
        threading.Thread(target=player, args=(a_read, a_write, args.rounds, True)),
        threading.Thread(target=player, args=(b_read, b_write, args.rounds, False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"{time.perf_counter() - start:.6f} {time.process_time():.6f}", flush=True)


if __name__ == "__main__":
    main()
