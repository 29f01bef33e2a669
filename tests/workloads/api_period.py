"""A process that asks for its own 1 s period, under an agent whose period is
a minute: burns 3.5 s of CPU, prints `done`, stays until killed."""
import time

from ferroscope import Profiler
from spin import spin


Profiler(application_name="own-period", period=1, upload_timeout=5, required=True).start()
spin(3.5)
print("done", flush=True)
while True:
    time.sleep(1)
