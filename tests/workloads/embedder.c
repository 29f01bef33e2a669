/* A C program that embeds CPython, as uwsgi or a C++ service would: it runs
 * `spin.spin(SECONDS)` from the workloads directory given as argv[1], in a
 * thread that C creates, not Python (argv[3] = "thread"), or in its main thread. */
#include <Python.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

static char code[4096];

static void *run_in_c_thread(void *failed) {
    PyGILState_STATE gil = PyGILState_Ensure();
    *(int *)failed = PyRun_SimpleString(code);
    PyGILState_Release(gil);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: embedder WORKLOADS_DIR SECONDS main|thread\n");
        return 2;
    }
    snprintf(code, sizeof code, "import sys\nsys.path.insert(0, '%s')\nimport spin\nspin.spin(%s)\n", argv[1], argv[2]);
    Py_Initialize();
    int failed = 0;
    if (strcmp(argv[3], "thread") == 0) {
        pthread_t thread;
        Py_BEGIN_ALLOW_THREADS
        pthread_create(&thread, NULL, run_in_c_thread, &failed);
        pthread_join(thread, NULL);
        Py_END_ALLOW_THREADS
    } else {
        failed = PyRun_SimpleString(code);
    }
    return Py_FinalizeEx() < 0 || failed ? 1 : 0;
}
