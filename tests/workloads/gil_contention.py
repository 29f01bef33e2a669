"""Two threads run Python code at once for SECONDS of wall time: only one can hold
the GIL, so each spends about half the run waiting for it.

Prints `native_thread_id` of each thread, then `elapsed SECONDS`.
"""
import sys
import threading
import time


def contend(seconds, ids):
    ids.append(threading.get_native_id())
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


if __name__ == "__main__":
    seconds = float(sys.argv[1])
    ids = []
    start = time.monotonic()
    threads = [threading.Thread(target=contend, args=(seconds, ids)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for tid in ids:
        print(tid)
    print("elapsed", time.monotonic() - start)
