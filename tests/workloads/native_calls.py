"""Spends its time in C code called from Python: zlib's compressor, then
SHA-256 (OpenSSL's), each under a Python function of its own.

Usage: native_calls.py SECONDS (of CPU time: half compressing, half hashing)."""
import hashlib
import sys
import time
import zlib


def compress_blob(data, seconds):
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        zlib.compress(data, 9)


def hash_blob(data, seconds):
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        hashlib.sha256(data).digest()


def main():
    seconds = float(sys.argv[1])
    # Compressible but not trivially: deflate searches for matches.
    data = b"".join(b"%d lorem ipsum %x dolor " % (i, i * 7919) for i in range(20000))
    compress_blob(data, seconds / 2)
    hash_blob(data, seconds / 2)


if __name__ == "__main__":
    main()
