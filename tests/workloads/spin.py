"""Burns CPU in `spin` until it has used the seconds of CPU given as its argument."""
import sys
import time


def spin(seconds):
    # CPU time, so that the number of samples does not depend on other load.
    deadline = time.process_time() + seconds
    acc = 1
    while time.process_time() < deadline:
        for i in range(1000):
            acc = (acc * 31 + i) % 1000003
    return acc


if __name__ == "__main__":
    spin(float(sys.argv[1]))
