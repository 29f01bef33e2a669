"""A CPU-bound workload with a known split: Cruncher.crunch_a, crunch_b and crunch_c
take 50%, 30% and 20% of its CPU.

The three methods run the same loop body, so the split comes only from their iteration
counts. Each round's length is drawn at random (about 1 to 20 ms) so that a sampler with a
fixed rate cannot lock onto the rounds' period.

    split.py --cpu-seconds S   run until it has used S seconds of CPU (the end-to-end tests:
                               the number of samples then does not depend on other load)
    split.py --rounds N        do a fixed amount of work (the benchmark)
    split.py --weights 2,3,5   another split (here 20/30/50), for the viewer's diff test

It prints `rounds_cpu SECONDS`, the CPU its rounds used, then its elapsed seconds and the
seconds of CPU it used.
"""
import argparse
import random
import time

# Iterations of each method per unit of work: 5:3:2 is 50/30/20.
WEIGHTS = (5, 3, 2)


class Cruncher:
    def __init__(self):
        self.acc = 1

    def crunch_a(self, iterations):
        acc = self.acc
        for i in range(iterations):
            acc = (acc * 31 + i) % 1000003
        self.acc = acc

    def crunch_b(self, iterations):
        acc = self.acc
        for i in range(iterations):
            acc = (acc * 31 + i) % 1000003
        self.acc = acc

    def crunch_c(self, iterations):
        acc = self.acc
        for i in range(iterations):
            acc = (acc * 31 + i) % 1000003
        self.acc = acc

    def run_round(self, unit, weights):
        self.crunch_a(weights[0] * unit)
        self.crunch_b(weights[1] * unit)
        self.crunch_c(weights[2] * unit)


def main():
    parser = argparse.ArgumentParser()
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--cpu-seconds", type=float)
    budget.add_argument("--rounds", type=int)
    parser.add_argument("--weights", default=",".join(map(str, WEIGHTS)))
    args = parser.parse_args()
    weights = [int(weight) for weight in args.weights.split(",")]

    # Seeded, so that the benchmark's runs all do the same work.
    rng = random.Random(20261122)
    cruncher = Cruncher()
    start = time.perf_counter()
    # CPU time of the rounds alone: starting up takes long on an emulated CPU.
    rounds_start = time.process_time()
    rounds = 0
    while True:
        if args.rounds is not None and rounds >= args.rounds:
            break
        if args.cpu_seconds is not None and time.process_time() >= args.cpu_seconds:
            break
        cruncher.run_round(rng.randint(2_000, 40_000), weights)
        rounds += 1
    print(f"rounds_cpu {time.process_time() - rounds_start:.6f}")
    print(f"{time.perf_counter() - start:.6f} {time.process_time():.6f}", flush=True)


if __name__ == "__main__":
    main()
