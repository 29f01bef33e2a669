"""Recurses DEPTH plain Python calls deep, then burns CPU in pure Python in the deepest
frame until SECONDS of wall-clock time have passed: a stack of known depth for the kernel's
cost per sample (`cargo xtask bench`, the agent's own cost). Its stacks are <module> and
DEPTH frames of `dive`.

    deep.py --depth DEPTH --seconds SECONDS
"""
import argparse
import time


def dive(frames, until):
    if frames > 1:
        return dive(frames - 1, until)
    # The deepest frame: the loop is here, not in a call of its own.
    acc = 1
    while time.monotonic() < until:
        for i in range(1000):
            acc = (acc * 31 + i) % 1000003
    return acc


parser = argparse.ArgumentParser()
parser.add_argument("--depth", type=int, required=True)
parser.add_argument("--seconds", type=float, required=True)
args = parser.parse_args()
dive(args.depth, time.monotonic() + args.seconds)
