"""Small objects only, with a known answer: each of ROUNDS rounds,
`three_quarters` makes 300,000 bare objects (16 bytes each) and
`one_quarter` 100,000, each batch kept until the same function makes the
next: 75% and 25% of the bytes allocated. Prints `done`. Sleeps 1 s first,
for the agent to attach its probes."""
import sys
import time


def three_quarters():
    return [object() for _ in range(300_000)]


def one_quarter():
    return [object() for _ in range(100_000)]


def main():
    time.sleep(1)
    big = small = None
    for _ in range(int(sys.argv[1])):
        big = three_quarters()
        small = one_quarter()
    print("done", len(big) + len(small), flush=True)


if __name__ == "__main__":
    main()
