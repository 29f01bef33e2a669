/* A known call tree, built without frame pointers (-O2 -fomit-frame-pointer):
 * main -> outer -> middle -> inner, which spins; and main -> outer -> other,
 * which spins a third as long. The profile must show each chain whole. */
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;

/* The process's CPU time, so that each function gets its share of samples however busy the
 * host is; a system call (no vDSO for it), so read every 100,000 rounds of a loop. */
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void inner(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 100000; i++) sink += i * i;
}

__attribute__((noinline)) void middle(double seconds) { inner(seconds); sink++; }

__attribute__((noinline)) void other(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 100000; i++) sink ^= i;
}

__attribute__((noinline)) void outer(double seconds) {
    middle(seconds * 0.75);
    other(seconds * 0.25);
    sink++;
}

int main(int argc, char **argv) {
    outer(argc > 1 ? atof(argv[1]) : 2.0);
    return 0;
}
