/* The ranker's last step (disagg.routing.scoring.Ranker.rank) in C: sum the scorers' terms per
 * candidate, order best first, settle ties. The same arithmetic in the same order as the Python
 * code (doubles are Python's floats), so the same answer: a test holds the two to it. A pick
 * ranks every endpoint of a role twice (decode, prefill), and in Python these few lines cost
 * more than the scorers. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

typedef struct {
    double total;
    Py_ssize_t index;
    long long queue;
    Py_ssize_t rotated; /* (index - turn) mod n: the rotating start among equals */
} Entry;

/* sorted(range(n), key=total, reverse=True): best first, equal totals in index order */
static int by_total(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    if (x->total != y->total)
        return x->total > y->total ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* (-total, queue, rotated) */
static int by_total_queue_turn(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    if (x->total != y->total)
        return x->total > y->total ? -1 : 1;
    if (x->queue != y->queue)
        return x->queue < y->queue ? -1 : 1;
    return x->rotated < y->rotated ? -1 : x->rotated > y->rotated;
}

/* top(terms, queues, turn, top) -> indices of the best `top` candidates, best first. `terms`:
 * lists of per-candidate scores to add up, in order; `queues`: each candidate's queue. */
static PyObject *top(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "top(terms: list, queues: list, turn: int, top: int)");
        return NULL;
    }
    PyObject *terms = args[0], *queues = args[1];
    Py_ssize_t n = PyList_GET_SIZE(queues);
    Py_ssize_t turn = PyLong_AsSsize_t(args[2]);
    Py_ssize_t want = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (n == 0 || want <= 0)
        return PyList_New(0);
    Entry *entries = PyMem_Malloc(n * sizeof(Entry));
    if (entries == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        entries[i].total = 0.0;
        entries[i].index = i;
        entries[i].queue = PyLong_AsLongLong(PyList_GET_ITEM(queues, i));
        entries[i].rotated = ((i - turn) % n + n) % n;
    }
    if (PyErr_Occurred())
        goto fail;
    for (Py_ssize_t t = 0; t < PyList_GET_SIZE(terms); t++) {
        PyObject *term = PyList_GET_ITEM(terms, t);
        if (!PyList_Check(term) || PyList_GET_SIZE(term) != n) {
            PyErr_SetString(PyExc_ValueError, "each term: a list with one score per candidate");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PyList_GET_ITEM(term, i);
            double score = PyFloat_CheckExact(item) ? PyFloat_AS_DOUBLE(item) : PyFloat_AsDouble(item);
            /* left to right, as Python adds them: the first term as it is */
            entries[i].total = t == 0 ? score : entries[i].total + score;
        }
        if (PyErr_Occurred())
            goto fail;
    }
    qsort(entries, n, sizeof(Entry), by_total);
    /* Sorted: equal totals among the first top + 1 sit side by side. */
    Py_ssize_t head = want + 1 < n ? want + 1 : n;
    int ties = 0;
    for (Py_ssize_t i = 1; i < head && !ties; i++)
        ties = entries[i].total == entries[i - 1].total;
    Py_ssize_t count = want < n ? want : n;
    if (ties) {
        /* Equal totals where they decide who places, or in what order: among those scoring at
         * least the top-th best total, the shorter queue first, then the rotating start. */
        double cut = entries[count - 1].total;
        Py_ssize_t placed = 0;
        while (placed < n && entries[placed].total >= cut)
            placed++;
        qsort(entries, placed, sizeof(Entry), by_total_queue_turn);
        if (count > placed)
            count = placed;
    }
    PyObject *out = PyList_New(count);
    for (Py_ssize_t i = 0; out != NULL && i < count; i++) {
        PyObject *index = PyLong_FromSsize_t(entries[i].index);
        if (index == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, index);
    }
    PyMem_Free(entries);
    return out;
fail:
    PyMem_Free(entries);
    return NULL;
}

static PyMethodDef methods[] = {
    {"top", (PyCFunction)(void (*)(void))top, METH_FASTCALL,
     "top(terms, queues, turn, top): the best `top` candidates' indices, best first (see Ranker.rank)."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rank", "The ranker's sum, order and tie-break in C (see disagg.routing.scoring).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__rank(void) { return PyModule_Create(&module); }
