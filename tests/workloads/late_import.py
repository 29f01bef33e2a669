"""Loads a C extension (zlib) only after it has run a while, then spends its time in it:
the extension's code is mapped after the agent first read the process's mappings.

Usage: late_import.py SECONDS (of CPU time in zlib, after 1.5 s asleep)."""
import os
import sys
import time


def compress_blob(zlib, data, seconds):
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        zlib.compress(data, 9)


def main():
    seconds = float(sys.argv[1])
    if not sys.flags.no_site:
        # Some sites import zlib at start-up (a .pth file's imports); same pid.
        os.execv(sys.executable, [sys.executable, "-S", *sys.argv])
    if "zlib" in sys.modules:
        sys.exit("zlib was loaded at start-up: nothing would be loaded late")
    time.sleep(1.5)
    import zlib

    data = b"".join(b"%d lorem ipsum %x dolor " % (i, i * 7919) for i in range(20000))
    compress_blob(zlib, data, seconds)


if __name__ == "__main__":
    main()
