"""A request-like loop with context labels: each round handles /checkout for
30 ms of CPU, then /search for 20 ms, for SECONDS of CPU: 60% and 40%."""
import sys
import time

from ferroscope import Profiler


def handle(seconds):
    deadline = time.process_time() + seconds
    acc = 1
    while time.process_time() < deadline:
        for i in range(200):
            acc = (acc * 31 + i) % 1000003
    return acc


profiler = Profiler(application_name="labelled-app", required=True)
profiler.start()
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    with profiler.labels(endpoint="/checkout"):
        handle(0.03)
    with profiler.labels(endpoint="/search"):
        handle(0.02)
profiler.stop()
print("done", flush=True)
while True:
    time.sleep(1)
