"""A mostly idle CPython process: wakes every 50 ms, forever, like a service waiting for
work (`cargo xtask bench`, the agent's own cost with many of them). Given a file, it first
appends its pid to it, so that whoever starts many can tell when they are all up. Run with
`-S`: without `site` it is smaller.

    idle.py [READY_FILE]
"""
import os
import sys
import time

if len(sys.argv) > 1:
    # One short write in append mode: lines from many processes do not interleave.
    with open(sys.argv[1], "a") as ready:
        ready.write(f"{os.getpid()}\n")
while True:
    time.sleep(0.05)
