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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
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

static PyMethodDef sockio_methods[] = {
    {"recv", (PyCFunction)sockio_recv, METH_O,
     "recv(fd) -> bytes | None: read what the socket has (up to RECV_SIZE bytes) without waiting; "
     "b'' at end of stream, None if nothing is there."},
    {"send", (PyCFunction)(void (*)(void))sockio_send, METH_FASTCALL,
     "send(fd, data) -> int: write what the socket takes now; 0 if it takes nothing."},
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
    PyObject *module = PyModule_Create(&sockio_module);
    if (module != NULL && PyModule_AddIntConstant(module, "RECV_SIZE", RECV_SIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
