/* A C program that embeds CPython, as uwsgi or a C++ service would: it runs
 * `spin.spin(SECONDS)` from the workloads directory given as argv[1]. */
#include <Python.h>
#include <stdio.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: embedder WORKLOADS_DIR SECONDS\n");
        return 2;
    }
    char code[4096];
    snprintf(code, sizeof code, "import sys\nsys.path.insert(0, '%s')\nimport spin\nspin.spin(%s)\n", argv[1], argv[2]);
    Py_Initialize();
    int failed = PyRun_SimpleString(code);
    return Py_FinalizeEx() < 0 || failed ? 1 : 0;
}
