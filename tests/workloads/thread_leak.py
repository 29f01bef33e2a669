"""A thread leak: every 0.25 s for SECONDS, starts two threads; one ends at
once, the other waits until the end. Live threads grow by one per 0.25 s,
and all stay for HOLD seconds (longer than the profiler's period, so that a
period ends with all of them live, however the periods fall).

Prints `started N` when all are started, then lets them end and burns a
little CPU, so that the period in which they end has samples of this process
(the counts of a period go with its profile)."""
import sys
import threading
import time


HOLD = 1.5


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
    leaks = []
    for _ in range(rounds):
        leaks.append(threading.Thread(target=leaked, args=(release,)))
        leaks[-1].start()
        threading.Thread(target=short_lived).start()
        time.sleep(0.25)
    time.sleep(HOLD)
    print("started", 2 * rounds, flush=True)
    release.set()
    for leak in leaks:
        leak.join()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
