/* Non-blocking socket reads and writes for the hot path's direct relay (see relay in pump.py).
 *
 * Both calls keep the GIL: the sockets are non-blocking, so a call never waits, and releasing
 * and retaking the GIL around each system call would cost more than the call itself. Both
 * retry on EINTR.
 *
 *   recv(fd) -> bytes | None    up to RECV_SIZE (64 KiB); b"" at end of stream; None if nothing
 *                               to read
 *   send(fd, data) -> int       bytes written (0 if the socket cannot take any now); data is any
 *                               buffer (bytes, bytearray, memoryview); never raises SIGPIPE
 *
 * Errors raise OSError with the errno (ConnectionResetError, BrokenPipeError, ...).
 *
 * And one scan of the pooled fast path (fastpool.py), too slow in compiled Python:
 *
 *   pin_words(data, start, end, forget) -> bool
 *                               whether data[start:end] (a statement text, not decoded) holds,
 *                               in any case, one of the words that may pin a pooled client
 *                               (fastpool.may_pin; with forget, may_forget too)
 *   digit_run(data, start, end) -> (int, int)
 *                               the bounds of the last run of ASCII digits in data[start:end],
 *                               (-1, -1) if there is none
 *   same_but_digits(data, start, end, prefix, suffix) -> bool
 *                               whether data[start:end] is prefix, one or more ASCII digits,
 *                               suffix: a text that differs from one scanned before only in a
 *                               number holds no word the other did not
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define RECV_SIZE (64 * 1024)

/* One buffer for the process: every call runs with the GIL held and copies out what it read
 * before returning. */
static char recv_buffer[RECV_SIZE];

static int
fd_of(PyObject *obj)
{
    long fd = PyLong_AsLong(obj);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "invalid file descriptor");
        return -1;
    }
    return (int)fd;
}

static PyObject *
sockio_recv(PyObject *module, PyObject *arg)
{
    int fd = fd_of(arg);
    if (fd < 0)
        return NULL;
    ssize_t n;
    do {
        n = recv(fd, recv_buffer, RECV_SIZE, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize(recv_buffer, n);
}

static PyObject *
sockio_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send() takes exactly 2 arguments (fd, data)");
        return NULL;
    }
    int fd = fd_of(args[0]);
    if (fd < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    ssize_t n;
    do {
        n = send(fd, view.buf, (size_t)view.len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    PyBuffer_Release(&view);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(n);
}

/* The words that may pin a pooled client (fastpool.may_pin) and, with forget, DEALLOCATE /
 * DISCARD (fastpool.may_forget): lower case; forget words flagged. */
struct word {
    const char *text;
    int forget;
};
static const struct word words[] = {
    {"set", 0}, {"into", 0}, {"temp", 0}, {"listen", 0}, {"lo_open", 0}, {"prepare", 0},
    {"advisory", 0}, {"declare", 0}, {"dblink", 0}, {"dealloc", 1}, {"discard", 1},
};
#define N_WORDS (sizeof(words) / sizeof(words[0]))

/* starts[c]: bit i set if words[i] starts with byte c (either case); most bytes start none,
 * and cost one load. */
static unsigned int starts[256];

static void
init_first_letters(void)
{
    for (size_t i = 0; i < N_WORDS; i++) {
        unsigned char lower = (unsigned char)words[i].text[0];
        starts[lower] |= 1u << i;
        starts[(unsigned char)(lower - 32)] |= 1u << i;
    }
}

/* Whether text (lower case, two letters or more) is at p (before end), whatever the case of
 * p's letters; its first two letters matched already. */
static int
word_at(const unsigned char *p, const unsigned char *end, const char *text)
{
    const unsigned char *q = p + 2;
    const char *w = text + 2;
    while (*w != '\0') {
        if (q >= end || (*q | 32) != ((unsigned char)*w | 32))
            return 0;
        w++;
        q++;
    }
    return 1;
}

/* The data, start and end (clamped to the data) of a call of ``name`` whose first three
 * arguments they are, of ``expected`` in all; -1 (an exception set) if they are not. */
static int
text_args(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
          const unsigned char **base, Py_ssize_t *start, Py_ssize_t *stop)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments", name, expected);
        return -1;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s() data must be bytes", name);
        return -1;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    *start = PyLong_AsSsize_t(args[1]);
    if (*start == -1 && PyErr_Occurred())
        return -1;
    *stop = PyLong_AsSsize_t(args[2]);
    if (*stop == -1 && PyErr_Occurred())
        return -1;
    if (*start < 0)
        *start = 0;
    if (*stop > size)
        *stop = size;
    if (*stop < *start)
        *stop = *start;
    *base = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    return 0;
}

static PyObject *
sockio_pin_words(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *base;
    Py_ssize_t start, stop;
    if (text_args("pin_words", args, nargs, 4, &base, &start, &stop) < 0)
        return NULL;
    int forget = PyObject_IsTrue(args[3]);
    if (forget < 0)
        return NULL;
    const unsigned char *end = base + stop;
    unsigned int allowed = 0;
    for (size_t i = 0; i < N_WORDS; i++) {
        if (forget || !words[i].forget)
            allowed |= 1u << i;
    }
    for (const unsigned char *p = base + start; p + 1 < end; p++) {
        unsigned int m = starts[*p] & allowed;
        if (m == 0)
            continue;
        unsigned char second = p[1] | 32;
        do {
            int i = __builtin_ctz(m);
            m &= m - 1;
            if (((unsigned char)words[i].text[1] | 32) == second
                    && word_at(p, end, words[i].text))
                Py_RETURN_TRUE;
        } while (m != 0);
    }
    Py_RETURN_FALSE;
}

static int
is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static PyObject *
sockio_digit_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *base;
    Py_ssize_t start, stop;
    if (text_args("digit_run", args, nargs, 3, &base, &start, &stop) < 0)
        return NULL;
    Py_ssize_t j = stop;
    while (j > start && !is_digit(base[j - 1]))
        j--;
    if (j == start)
        return Py_BuildValue("(nn)", (Py_ssize_t)-1, (Py_ssize_t)-1);
    Py_ssize_t i = j - 1;
    while (i > start && is_digit(base[i - 1]))
        i--;
    return Py_BuildValue("(nn)", i, j);
}

static PyObject *
sockio_same_but_digits(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *base;
    Py_ssize_t start, stop;
    if (text_args("same_but_digits", args, nargs, 5, &base, &start, &stop) < 0)
        return NULL;
    if (!PyBytes_Check(args[3]) || !PyBytes_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "prefix and suffix must be bytes");
        return NULL;
    }
    Py_ssize_t np = PyBytes_GET_SIZE(args[3]), ns = PyBytes_GET_SIZE(args[4]);
    if (stop - start <= np + ns)
        Py_RETURN_FALSE;
    if (memcmp(base + start, PyBytes_AS_STRING(args[3]), (size_t)np) != 0
            || memcmp(base + stop - ns, PyBytes_AS_STRING(args[4]), (size_t)ns) != 0)
        Py_RETURN_FALSE;
    for (const unsigned char *p = base + start + np, *e = base + stop - ns; p < e; p++) {
        if (!is_digit(*p))
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef sockio_methods[] = {
    {"recv", (PyCFunction)sockio_recv, METH_O,
     "recv(fd) -> bytes | None: read what the socket has (up to RECV_SIZE bytes) without waiting; "
     "b'' at end of stream, None if nothing is there."},
    {"send", (PyCFunction)(void (*)(void))sockio_send, METH_FASTCALL,
     "send(fd, data) -> int: write what the socket takes now; 0 if it takes nothing."},
    {"pin_words", (PyCFunction)(void (*)(void))sockio_pin_words, METH_FASTCALL,
     "pin_words(data, start, end, forget) -> bool: whether data[start:end] holds, in any case, "
     "a word that may pin a pooled client (with forget: DEALLOCATE / DISCARD too)."},
    {"digit_run", (PyCFunction)(void (*)(void))sockio_digit_run, METH_FASTCALL,
     "digit_run(data, start, end) -> (int, int): the last run of ASCII digits in "
     "data[start:end], or (-1, -1)."},
    {"same_but_digits", (PyCFunction)(void (*)(void))sockio_same_but_digits, METH_FASTCALL,
     "same_but_digits(data, start, end, prefix, suffix) -> bool: whether data[start:end] is "
     "prefix, ASCII digits (one or more), suffix."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sockio_module = {
    PyModuleDef_HEAD_INIT,
    "sqlproxy.proxy._sockio",
    "Non-blocking socket reads and writes that keep the GIL (the hot path's direct relay).",
    -1,
    sockio_methods,
};

PyMODINIT_FUNC
PyInit__sockio(void)
{
    init_first_letters();
    PyObject *module = PyModule_Create(&sockio_module);
    if (module != NULL && PyModule_AddIntConstant(module, "RECV_SIZE", RECV_SIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
