"""Two threads hash large buffers at once: hashlib releases the GIL while it hashes, so
both run on a CPU together, one of them without the GIL. Each stops after the seconds of
its own CPU time given as the argument."""
import hashlib
import sys
import threading
import time

DATA = b"x" * (1 << 20)


def hash_in_thread_a(seconds):
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        hashlib.sha256(DATA).digest()


def hash_in_thread_b(seconds):
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        hashlib.sha256(DATA).digest()


if __name__ == "__main__":
    seconds = float(sys.argv[1])
    threads = [threading.Thread(target=f, args=(seconds,)) for f in (hash_in_thread_a, hash_in_thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
