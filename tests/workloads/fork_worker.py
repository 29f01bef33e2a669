"""Forks a worker, as gunicorn does, without exec: the child runs `spin.spin` for the
seconds given, the parent prints the child's pid and waits for it."""
import os
import sys

import spin

if __name__ == "__main__":
    child = os.fork()
    if child == 0:
        spin.spin(float(sys.argv[1]))
        os._exit(0)
    print(child, flush=True)
    os.waitpid(child, 0)
