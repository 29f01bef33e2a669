"""Python and C calling each other, where the Python and native stacks do not
match one to one: `sorted` (C) calls `key` (Python), which calls zlib's
`crc32` (C); a generator compresses each time `drain` resumes it.

Usage: callbacks.py SECONDS (of CPU time, half each)."""
import sys
import time
import zlib

BLOB = bytes(range(256)) * 64


def key(item):
    return zlib.crc32(BLOB, item)


def sort_blobs(seconds):
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        sorted(range(200), key=key)


def compressions():
    while True:
        yield zlib.compress(BLOB * 8, 9)


def drain(seconds):
    deadline = time.process_time() + seconds
    for _ in compressions():
        if time.process_time() >= deadline:
            break


def main():
    seconds = float(sys.argv[1])
    sort_blobs(seconds / 2)
    drain(seconds / 2)


if __name__ == "__main__":
    main()
