/* A program that becomes a Python process late, as uwsgi does when it loads its Python
 * plugin: it burns CPU in C first (so a profiler sees it before any Python), then loads
 * libpython (argv[1]) with dlopen and runs `spin.spin(SECONDS)` from WORKLOADS_DIR. */
#include <dlfcn.h>
#include <stdio.h>
#include <time.h>

static double cpu_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
    return now.tv_sec + now.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: dlopener LIBPYTHON WORKLOADS_DIR SECONDS\n");
        return 2;
    }
    volatile unsigned long acc = 1;
    while (cpu_seconds() < 0.5) {
        acc = acc * 31 + 7;
    }
    void *python = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
    if (!python) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    void (*initialize)(void) = (void (*)(void))dlsym(python, "Py_Initialize");
    int (*run)(const char *) = (int (*)(const char *))dlsym(python, "PyRun_SimpleString");
    int (*finalize)(void) = (int (*)(void))dlsym(python, "Py_FinalizeEx");
    if (!initialize || !run || !finalize) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    char code[4096];
    snprintf(code, sizeof code, "import sys\nsys.path.insert(0, '%s')\nimport spin\nspin.spin(%s)\n", argv[2], argv[3]);
    initialize();
    int failed = run(code);
    return finalize() < 0 || failed ? 1 : 0;
}
