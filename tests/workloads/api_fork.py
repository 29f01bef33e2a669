"""A registered process that burns CPU in a thread and in a forked child:
both are profiled under its name. Prints `done` at the end and stays until
killed."""
import os
import threading
import time

from ferroscope import Profiler
from spin import spin


def in_thread():
    spin(1)


def in_child():
    # The child's own CPU clock starts at zero.
    spin(1)


profiler = Profiler(application_name="forking-app", labels={"kind": "api"}, required=True)
profiler.start()
worker = threading.Thread(target=in_thread, name="worker")
worker.start()
worker.join()
child = os.fork()
if child == 0:
    in_child()
    os._exit(0)
os.waitpid(child, 0)
print("done", flush=True)
while True:
    time.sleep(1)
