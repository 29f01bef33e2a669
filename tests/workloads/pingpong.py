"""Switch-heavy: two processes pass one byte back and forth through two pipes
ROUNDS times, with a little work at each pass, so that each blocks and wakes
ROUNDS times: tens of thousands of context switches a second. Processes, not
threads: two threads would hand the GIL over at every round trip, and the
time that takes varies more than what is measured. Both on one CPU, so that
a round trip is two context switches, not wake-ups of idle CPUs, whose cost
depends on what else runs.

Prints `elapsed_seconds cpu_seconds` (CPU of both processes).
"""
import argparse
import os
import time


def play(read_fd, write_fd, rounds):
    for _ in range(rounds):
        os.read(read_fd, 1)
        work()
        os.write(write_fd, b"x")


def work():
    """About 20 us: a service does some work per message."""
    return sum(range(2000))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args()
    to_child_read, to_child_write = os.pipe()
    to_parent_read, to_parent_write = os.pipe()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    start = time.perf_counter()
    child = os.fork()
    if child == 0:
        play(to_child_read, to_parent_write, args.rounds)
        os._exit(0)
    os.write(to_child_write, b"x")
    play(to_parent_read, to_child_write, args.rounds - 1)
    os.read(to_parent_read, 1)
    os.waitpid(child, 0)
    elapsed = time.perf_counter() - start
    usage = os.times()
    cpu = usage.user + usage.system + usage.children_user + usage.children_system
    print(f"{elapsed:.6f} {cpu:.6f}", flush=True)


if __name__ == "__main__":
    main()
