"""A thread leak: every 0.25 s for SECONDS, starts two threads; one ends at
once, the other waits until the end. Live threads grow by one per 0.25 s.

Prints `started N` when all are started."""
import sys
import threading
import time


def leaked(release):
    release.wait()


def short_lived():
    pass


if __name__ == "__main__":
    seconds = float(sys.argv[1])
    # Let the agent finish starting up first (naming its first frames loads
    # symbol tables, which can hold its first periods for seconds): that
    # must not fall in the periods this counts.
    time.sleep(3)
    release = threading.Event()
    rounds = int(seconds / 0.25)
    for _ in range(rounds):
        threading.Thread(target=leaked, args=(release,)).start()
        threading.Thread(target=short_lived).start()
        time.sleep(0.25)
    print("started", 2 * rounds, flush=True)
    release.set()
