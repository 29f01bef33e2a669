"""Two threads run Python code at once for SECONDS of wall time: only one can hold
the GIL, so each spends about half the run waiting for it."""
import sys
import threading
import time


def contend(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


if __name__ == "__main__":
    seconds = float(sys.argv[1])
    threads = [threading.Thread(target=contend, args=(seconds,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
