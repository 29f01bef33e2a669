"""The Python API's example, run for real: profiled as `my-python-app` with
`my-extra-label=data` while `spin` burns 2 s of CPU, stopped, then started
again with another label for 1 s more. Prints `done` at the end, and stays
until killed (its profiles must have been flushed by `stop()`, not by the
process's exit)."""
import time

from ferroscope import Profiler
from spin import spin


profiler = Profiler(application_name="my-python-app", labels={"my-extra-label": "data"}, required=True)
profiler.start()
spin(2)
profiler.stop()
# Not profiled as my-python-app: stopped.
spin(0.5)
again = Profiler(application_name="my-python-app", labels={"round": "2"}, required=True)
again.start()
spin(1)
again.stop()
print("done", flush=True)
while True:
    time.sleep(1)
