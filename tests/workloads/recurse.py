"""Burns CPU in `burn` at the bottom of a recursion DEPTH calls of `descend` deep, called
from the module itself: its stacks are <module>, descend x DEPTH, burn.

    recurse.py CPU_SECONDS [DEPTH=100]
"""
import sys
import time


def burn(seconds):
    # CPU time, so that the number of samples does not depend on other load.
    deadline = time.process_time() + seconds
    acc = 1
    while time.process_time() < deadline:
        for i in range(1000):
            acc = (acc * 31 + i) % 1000003
    return acc


def descend(depth, seconds):
    if depth == 1:
        return burn(seconds)  # the deepest descend
    return descend(depth - 1, seconds)  # every other descend


descend(int(sys.argv[2]) if len(sys.argv) > 2 else 100, float(sys.argv[1]))
