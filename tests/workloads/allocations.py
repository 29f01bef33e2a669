"""Allocations with a known answer. Each of ROUNDS rounds (at most 200):
`churn` allocates and drops two 1 MiB bytearrays, `keep` allocates one
1 MiB bytearray and keeps it, `small_dicts` allocates 2,000 small dicts and
drops them. Then prints `holding` and keeps what `keep` allocated until
killed. It first sleeps 1 s: the agent attaches its probes once it has
looked at a new process, and allocations before that are not seen.
"""
import sys
import time

MIB = 1 << 20


def churn():
    for _ in range(2):
        block = bytearray(MIB)
        block[-1] = 1


def keep(kept):
    kept.append(bytearray(MIB))


def small_dicts():
    return len([{"n": i} for i in range(2000)])


def main():
    rounds = min(int(sys.argv[1]), 200)
    time.sleep(1)
    kept = []
    for _ in range(rounds):
        churn()
        keep(kept)
        small_dicts()
        time.sleep(0.02)
    print("holding", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
