"""Threads with known wall and off-CPU times: the main thread burns CPU for
SECONDS while three threads wait all along: one sleeps, one waits on an Event,
one blocks on a pipe read.

Prints `role native_thread_id` per thread, then `elapsed SECONDS`,
`main_cpu SECONDS` (the main thread's CPU time as the kernel counts it) and
`lifetime SECONDS` (since the process started, interpreter start-up included)
and `startup_cpu SECONDS` (the CPU the interpreter took to get to `main`).
"""
import argparse
import os
import threading
import time


def burn(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def sleeper(seconds):
    time.sleep(seconds)


def event_waiter(event):
    event.wait()


def pipe_reader(fd):
    os.read(fd, 1)


def run(role, target, args, ids):
    ids[role] = threading.get_native_id()
    target(*args)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    options = parser.parse_args()
    # Time for the profiler to find this process before the threads start.
    startup_cpu = time.process_time()
    burn(1.0)
    ids = {"main": threading.get_native_id()}
    started = time.monotonic()
    event = threading.Event()
    read_end, write_end = os.pipe()
    roles = [("sleeper", sleeper, (options.seconds,)), ("event_waiter", event_waiter, (event,)),
             ("pipe_reader", pipe_reader, (read_end,))]
    threads = [threading.Thread(target=run, args=(role, target, args, ids)) for role, target, args in roles]
    for thread in threads:
        thread.start()
    burn(options.seconds)
    event.set()
    os.write(write_end, b"x")
    for thread in threads:
        thread.join()
    for role, tid in ids.items():
        print(role, tid)
    print("elapsed", time.monotonic() - started)
    print("main_cpu", time.thread_time())
    print("startup_cpu", startup_cpu)
    print("lifetime", lifetime())


def lifetime():
    """Seconds since this process started, interpreter start-up included."""
    with open("/proc/self/stat") as stat:
        started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        now = float(uptime.read().split()[0])
    return now - started_ticks / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
