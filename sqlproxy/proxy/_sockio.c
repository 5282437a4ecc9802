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
 * And one scan of the pooled fast path (pinscan.py), too slow in compiled Python:
 *
 *   pin_words(data, start, end, forget) -> bool
 *                               whether data[start:end] (a statement text, not decoded) holds,
 *                               in any case, one of the words that may pin a pooled client
 *                               (pinscan.may_pin; with forget, may_forget too)
 *   digit_run(data, start, end) -> (int, int)
 *                               the bounds of the last run of ASCII digits in data[start:end],
 *                               (-1, -1) if there is none
 *   text(data, start, end) -> str
 *                               data[start:end] up to its first NUL, decoded from UTF-8 with
 *                               invalid bytes replaced (a statement's text, as the server reads
 *                               it), without a copy of the bytes first
 *   same_but_digits(data, start, end, prefix, suffix) -> bool
 *                               whether data[start:end] is prefix, one or more ASCII digits,
 *                               suffix: a text that differs from one scanned before only in a
 *                               number holds no word the other did not
 *
 * And the relay's readiness watch (see readers in pump.py):
 *
 *   Poller()                    an epoll instance of its own, whose descriptor the event loop
 *                               watches (one loop reader for all the relayed sockets)
 *     .add(fd, callback)        call callback(now) whenever fd is readable (level-triggered;
 *                               now: when epoll reported it, time.perf_counter's clock, read
 *                               once per batch); replaces the callback of an fd added already
 *     .remove(fd) -> bool       stop watching fd (before it is closed); False if it was not
 *     .dispatch()               call the callbacks of the sockets readable now (at most
 *                               MAX_EVENTS; the others stay ready for the next call); the
 *                               first exception from a callback is raised after the others
 *                               had their turn
 *     .set_after(callback)      call callback() after each batch, once its sockets had their
 *                               turn (None: no more); work that can wait for the batch's end
 *                               (see Batch in pump.py)
 *     .fileno(), len(), .close()
 *
 * The event loop would otherwise take the GIL, and run its handle machinery, once per
 * readable socket; a poller takes it once per batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <time.h>
#include <sys/types.h>

#define RECV_SIZE (64 * 1024)

/* answer_scan: the backend messages the conversation reads (conversation._BE_BODY_NEEDED). */
#define BE_BODY_NEEDED "CIEsZSGHW"

static unsigned char be_needed[256]; /* 1 for each of BE_BODY_NEEDED and for 0 (invalid) */

static void
init_be_needed(void)
{
    be_needed[0] = 1;
    for (const char *c = BE_BODY_NEEDED; *c; c++)
        be_needed[(unsigned char)*c] = 1;
}

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
    ssize_t n;
    if (PyBytes_CheckExact(args[1])) { /* the common case: no buffer to take and give back */
        const char *buf = PyBytes_AS_STRING(args[1]);
        size_t len = (size_t)PyBytes_GET_SIZE(args[1]);
        do {
            n = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
    }
    else {
        Py_buffer view;
        if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
            return NULL;
        do {
            n = send(fd, view.buf, (size_t)view.len, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        PyBuffer_Release(&view);
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(n);
}

/* The words that may pin a pooled client (pinscan.may_pin) and, with forget, DEALLOCATE /
 * DISCARD (pinscan.may_forget): lower case; forget words flagged. */
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

/* cache.INT_KEY_DIGITS: an integer literal of at most this many digits is answered as its
 * value (an int), a value key that costs no string. */
#define INT_KEY_DIGITS 18

/* The value key of the ASCII digits base[a:b]: their value (an int) for up to
 * INT_KEY_DIGITS of them, else their text. */
static PyObject *
digits_key(const unsigned char *base, Py_ssize_t a, Py_ssize_t b)
{
    if (b - a <= INT_KEY_DIGITS) {
        long long v = 0;
        for (Py_ssize_t i = a; i < b; i++)
            v = v * 10 + (long long)(base[i] - '0');
        return PyLong_FromLongLong(v);
    }
    /* ASCII, copied as they are (no decoder to check them again). */
    PyObject *digits = PyUnicode_New(b - a, 127);
    if (digits != NULL)
        memcpy(PyUnicode_DATA(digits), base + a, (size_t)(b - a));
    return digits;
}

/* Whether base[start:stop] is prefix, then at least one byte (base[*a:*b]), then suffix;
 * -1 (TypeError set, naming ``name``) when prefix or suffix is not bytes. */
static int
framed_by(const char *name, const unsigned char *base, Py_ssize_t start, Py_ssize_t stop,
          PyObject *prefix, PyObject *suffix, Py_ssize_t *a, Py_ssize_t *b)
{
    if (!PyBytes_Check(prefix) || !PyBytes_Check(suffix)) {
        PyErr_Format(PyExc_TypeError, "%s() prefix and suffix must be bytes", name);
        return -1;
    }
    Py_ssize_t np = PyBytes_GET_SIZE(prefix), ns = PyBytes_GET_SIZE(suffix);
    *a = start + np;
    *b = stop - ns;
    return *b > *a && memcmp(base + start, PyBytes_AS_STRING(prefix), (size_t)np) == 0
           && memcmp(base + *b, PyBytes_AS_STRING(suffix), (size_t)ns) == 0;
}

static int
all_digits(const unsigned char *base, Py_ssize_t a, Py_ssize_t b)
{
    for (Py_ssize_t i = a; i < b; i++)
        if (!is_digit(base[i]))
            return 0;
    return 1;
}

static PyObject *
sockio_same_but_digits(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *base;
    Py_ssize_t start, stop, a, b;
    if (text_args("same_but_digits", args, nargs, 5, &base, &start, &stop) < 0)
        return NULL;
    int framed = framed_by("same_but_digits", base, start, stop, args[3], args[4], &a, &b);
    if (framed < 0)
        return NULL;
    if (!framed || !all_digits(base, a, b))
        Py_RETURN_NONE;
    return digits_key(base, a, b);
}

/* The end of the message of type kind at pos (whole within n, its length 4 to max), or -1
 * (pinscan._message_end). */
static Py_ssize_t
message_end(const unsigned char *d, Py_ssize_t n, Py_ssize_t pos, unsigned char kind,
            Py_ssize_t max)
{
    if (n - pos < 5 || d[pos] != kind)
        return -1;
    Py_ssize_t size = ((Py_ssize_t)d[pos + 1] << 24) | ((Py_ssize_t)d[pos + 2] << 16)
                      | ((Py_ssize_t)d[pos + 3] << 8) | (Py_ssize_t)d[pos + 4];
    if (size < 4 || size > max || pos + 1 + size > n)
        return -1;
    return pos + 1 + size;
}

/* unit_layout(data, max_message): see pinscan.unit_layout_at, its definition. */
static PyObject *
sockio_unit_layout(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "unit_layout() takes (data: bytes, max_message: int)");
        return NULL;
    }
    Py_ssize_t max = PyLong_AsSsize_t(args[1]);
    if (max == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = 0, pend = 0;
    if (n > 0 && d[0] == 'P') {
        pend = message_end(d, n, 0, 'P', max);
        if (pend < 8 || pend >= (1 << 12) || d[5] != 0)
            return PyLong_FromLong(-1);
        pos = pend;
    }
    Py_ssize_t bend = message_end(d, n, pos, 'B', max);
    if (bend - pos < 7 || bend - pos >= (1 << 10) || d[pos + 5] != 0)
        return PyLong_FromLong(-1);
    const unsigned char *z = memchr(d + pos + 6, 0, (size_t)(bend - pos - 6));
    if (z == NULL || z - d - pos - 6 >= (1 << 7))
        return PyLong_FromLong(-1);
    long stmt = (long)(z - d - pos - 6);
    Py_ssize_t epos = bend;
    long describe = 0;
    if (n - bend > 5 && d[bend] == 'D') {
        epos = message_end(d, n, bend, 'D', max);
        if (epos - bend != 7 || d[bend + 5] != 'P' || d[bend + 6] != 0)
            return PyLong_FromLong(-1);
        describe = 1;
    }
    Py_ssize_t eend = message_end(d, n, epos, 'E', max);
    if (eend - epos != 10 || d[epos + 5] != 0 || message_end(d, n, eend, 'S', max) != n
            || n - eend != 5)
        return PyLong_FromLong(-1);
    return PyLong_FromLong((long)pend | ((long)(bend - pos) << 12) | (stmt << 22)
                           | (describe << 29));
}

/* ------------------------------------------------------------------ Poller */

#define MAX_EVENTS 64

typedef struct {
    PyObject_HEAD
    int epfd;               /* -1 once closed */
    PyObject **callbacks;   /* by descriptor; NULL: not watched */
    int capacity;
    Py_ssize_t count;
    PyObject *after;        /* called with no arguments after each batch; NULL: none */
} Poller;

static void
poller_clear_callbacks(Poller *self)
{
    PyObject **callbacks = self->callbacks;
    int capacity = self->capacity;
    self->callbacks = NULL;
    self->capacity = 0;
    self->count = 0;
    if (callbacks == NULL)
        return;
    for (int i = 0; i < capacity; i++)
        Py_XDECREF(callbacks[i]);
    PyMem_Free(callbacks);
}

static void
poller_clear_after(Poller *self)
{
    PyObject *after = self->after;
    self->after = NULL;
    Py_XDECREF(after);
}

static PyObject *
poller_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Poller() takes no arguments");
        return NULL;
    }
    Poller *self = (Poller *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->callbacks = NULL;
    self->capacity = 0;
    self->count = 0;
    self->after = NULL;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
poller_traverse(Poller *self, visitproc visit, void *arg)
{
    for (int i = 0; i < self->capacity; i++)
        Py_VISIT(self->callbacks[i]);
    Py_VISIT(self->after);
    return 0;
}

static int
poller_clear(Poller *self)
{
    poller_clear_callbacks(self);
    poller_clear_after(self);
    return 0;
}

static void
poller_dealloc(Poller *self)
{
    PyObject_GC_UnTrack(self);
    poller_clear_callbacks(self);
    poller_clear_after(self);
    if (self->epfd >= 0)
        close(self->epfd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
poller_open(Poller *self)
{
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the poller is closed");
        return -1;
    }
    return 0;
}

static PyObject *
poller_add(Poller *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add() takes exactly 2 arguments (fd, callback)");
        return NULL;
    }
    if (poller_open(self) < 0)
        return NULL;
    int fd = fd_of(args[0]);
    if (fd < 0)
        return NULL;
    PyObject *callback = args[1];
    if (!PyCallable_Check(callback)) {
        PyErr_SetString(PyExc_TypeError, "add() callback must be callable");
        return NULL;
    }
    if (fd >= self->capacity) {
        int capacity = self->capacity ? self->capacity : 64;
        while (capacity <= fd)
            capacity *= 2;
        PyObject **grown = PyMem_Realloc(self->callbacks, sizeof(PyObject *) * (size_t)capacity);
        if (grown == NULL)
            return PyErr_NoMemory();
        for (int i = self->capacity; i < capacity; i++)
            grown[i] = NULL;
        self->callbacks = grown;
        self->capacity = capacity;
    }
    PyObject *old = self->callbacks[fd];
    if (old == NULL) {
        struct epoll_event ev;
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        self->count++;
    }
    Py_INCREF(callback);
    self->callbacks[fd] = callback;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *
poller_remove(Poller *self, PyObject *arg)
{
    int fd = fd_of(arg);
    if (fd < 0)
        return NULL;
    if (fd >= self->capacity || self->callbacks[fd] == NULL)
        Py_RETURN_FALSE;
    PyObject *old = self->callbacks[fd];
    self->callbacks[fd] = NULL;
    self->count--;
    /* (ENOENT / EBADF: the descriptor was closed first; nothing is watched any more.) */
    if (self->epfd >= 0 && epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL) < 0
            && errno != ENOENT && errno != EBADF) {
        Py_DECREF(old);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_DECREF(old);
    Py_RETURN_TRUE;
}

/* One call of a batch: callback(arg), or callback() when arg is NULL. Its error, if the
 * batch's first, is kept in *type, *value, *traceback (raised once the batch is done); a later
 * one goes to sys.unraisablehook. */
static void
batch_call(PyObject *callback, PyObject *arg, PyObject **type, PyObject **value,
           PyObject **traceback)
{
    Py_INCREF(callback);  /* the call may drop the poller's reference */
    PyObject *result = arg != NULL ? PyObject_CallOneArg(callback, arg)
                                   : PyObject_CallNoArgs(callback);
    if (result == NULL) {
        if (*type == NULL)
            PyErr_Fetch(type, value, traceback);
        else
            PyErr_WriteUnraisable(callback);
    }
    else {
        Py_DECREF(result);
    }
    Py_DECREF(callback);
}

static PyObject *
poller_dispatch(Poller *self, PyObject *Py_UNUSED(ignored))
{
    if (self->epfd < 0)
        Py_RETURN_NONE;
    struct epoll_event events[MAX_EVENTS];
    int n;
    do {
        n = epoll_wait(self->epfd, events, MAX_EVENTS, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (n == 0)
        Py_RETURN_NONE;
    /* The batch's time, as time.perf_counter() reads it on Linux (CLOCK_MONOTONIC, in
     * nanoseconds, then seconds): one reading for every socket of the batch. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
    PyObject *now = PyFloat_FromDouble((double)ns / 1e9);
    if (now == NULL)
        return NULL;
    /* A callback's exception does not keep the others from their turn (epoll reports the
     * sockets in the same order again): the first is raised once all had theirs, any other
     * goes to sys.unraisablehook. */
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    Py_INCREF(self);  /* a callback may drop the last other reference (closing the poller) */
    for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        /* Looked up now: an earlier callback may have removed it (or put another there,
         * which then finds nothing to read). */
        if (fd >= self->capacity || self->callbacks[fd] == NULL)
            continue;
        batch_call(self->callbacks[fd], now, &type, &value, &traceback);
    }
    if (self->after != NULL)
        batch_call(self->after, NULL, &type, &value, &traceback);
    Py_DECREF(self);
    Py_DECREF(now);
    if (type != NULL) {
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
poller_set_after(Poller *self, PyObject *arg)
{
    if (arg != Py_None && !PyCallable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_after() takes a callable or None");
        return NULL;
    }
    PyObject *old = self->after;
    if (arg == Py_None) {
        self->after = NULL;
    }
    else {
        Py_INCREF(arg);
        self->after = arg;
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *
poller_fileno(Poller *self, PyObject *Py_UNUSED(ignored))
{
    if (poller_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->epfd);
}

static PyObject *
poller_close(Poller *self, PyObject *Py_UNUSED(ignored))
{
    poller_clear_callbacks(self);
    poller_clear_after(self);
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    Py_RETURN_NONE;
}

static Py_ssize_t
poller_len(Poller *self)
{
    return self->count;
}

static PyMethodDef poller_methods[] = {
    {"add", (PyCFunction)(void (*)(void))poller_add, METH_FASTCALL,
     "add(fd, callback): call callback() whenever fd is readable."},
    {"remove", (PyCFunction)poller_remove, METH_O,
     "remove(fd) -> bool: stop watching fd (False if it was not watched)."},
    {"dispatch", (PyCFunction)poller_dispatch, METH_NOARGS,
     "dispatch(): call the callbacks of the descriptors readable now."},
    {"set_after", (PyCFunction)poller_set_after, METH_O,
     "set_after(callback): call callback() after each batch of callbacks (None: no more)."},
    {"fileno", (PyCFunction)poller_fileno, METH_NOARGS, "fileno() -> int: the epoll descriptor."},
    {"close", (PyCFunction)poller_close, METH_NOARGS,
     "close(): close the epoll descriptor and drop every callback."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods poller_as_sequence = {
    .sq_length = (lenfunc)poller_len,
};

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sqlproxy.proxy._sockio.Poller",
    .tp_basicsize = sizeof(Poller),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An epoll instance calling a callback per readable descriptor (see the module doc).",
    .tp_new = poller_new,
    .tp_dealloc = (destructor)poller_dealloc,
    .tp_traverse = (traverseproc)poller_traverse,
    .tp_clear = (inquiry)poller_clear,
    .tp_methods = poller_methods,
    .tp_as_sequence = &poller_as_sequence,
};

/* text() and cstring(): the string at data[start:stop] up to its first NUL, decoded from UTF-8
 * (invalid bytes replaced); without a NUL, all of it (or, nul_needed, None). */
static PyObject *
decode_upto_nul(const char *name, PyObject *const *args, Py_ssize_t nargs, int nul_needed)
{
    const unsigned char *base;
    Py_ssize_t start, stop;
    if (text_args(name, args, nargs, 3, &base, &start, &stop) < 0)
        return NULL;
    const unsigned char *nul = memchr(base + start, 0, (size_t)(stop - start));
    if (nul != NULL)
        stop = nul - base;
    else if (nul_needed)
        Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8((const char *)base + start, stop - start, "replace");
}

static PyObject *
sockio_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return decode_upto_nul("text", args, nargs, 0);
}

/* Whether text[at:at + len(part)] equals part (text holds that many characters there). */
static int
same_part(int kind, const void *data, Py_ssize_t at, PyObject *part)
{
    int pkind = PyUnicode_KIND(part);
    const void *pdata = PyUnicode_DATA(part);
    Py_ssize_t m = PyUnicode_GET_LENGTH(part);
    if (pkind == kind)
        return memcmp((const char *)data + at * kind, pdata, (size_t)(m * kind)) == 0;
    for (Py_ssize_t i = 0; i < m; i++)
        if (PyUnicode_READ(kind, data, at + i) != PyUnicode_READ(pkind, pdata, i))
            return 0;
    return 1;
}

/* cache.same_skeleton, in place on the text's characters (see its definition there):
 * whether text[a:b] is one plain literal of the kind (string or not). */
static int
plain_literal(PyObject *text, Py_ssize_t a, Py_ssize_t b, int string)
{
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    if (!string) {
        for (Py_ssize_t i = a; i < b; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            if (c < '0' || c > '9')
                return 0;
        }
        return 1;
    }
    b -= 1; /* the closing quote */
    if (b <= a || PyUnicode_READ(kind, data, a) != '\'' || PyUnicode_READ(kind, data, b) != '\'')
        return 0;
    for (Py_ssize_t i = a + 1; i < b; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 58) {
            if (c == '\'' || c == '$' || c == '"')
                return 0;
            if ((c == '-' || c == '/') && i + 1 < b) {
                Py_UCS4 d = PyUnicode_READ(kind, data, i + 1);
                if ((c == '-' && d == '-') || (c == '/' && d == '*'))
                    return 0; /* the start of a comment */
            }
        }
        else if (c == '\\')
            return 0;
    }
    return 1;
}


/* skeleton_literal(text, prefix, suffix, string): the literal when cache.same_skeleton says
 * yes (an int for an integer literal of up to INT_KEY_DIGITS digits), else None. */
static PyObject *
sockio_skeleton_literal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyUnicode_Check(args[0]) || !PyUnicode_Check(args[1])
            || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "skeleton_literal() takes (text: str, prefix: str, suffix: str, string)");
        return NULL;
    }
    int string = PyObject_IsTrue(args[3]);
    if (string < 0)
        return NULL;
    PyObject *text = args[0];
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    Py_ssize_t a = PyUnicode_GET_LENGTH(args[1]);
    Py_ssize_t b = n - PyUnicode_GET_LENGTH(args[2]);
    if (b <= a)
        Py_RETURN_NONE;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    if (!same_part(kind, data, 0, args[1]) || !same_part(kind, data, b, args[2])
            || !plain_literal(text, a, b, string))
        Py_RETURN_NONE;
    if (!string && b - a <= INT_KEY_DIGITS) {
        long long v = 0;
        for (Py_ssize_t i = a; i < b; i++)
            v = v * 10 + (long long)(PyUnicode_READ(kind, data, i) - '0');
        return PyLong_FromLongLong(v);
    }
    return PyUnicode_Substring(text, a, b);
}

/* skeleton_literal_bytes(data, start, stop, prefix, suffix, string): skeleton_literal of the
 * text data[start:stop] (up to its first NUL) decoded from UTF-8, answered on its bytes before
 * it is decoded: prefix and suffix are the UTF-8 of skeleton_literal's, the literal is decoded
 * alone. A yes is skeleton_literal's yes (the prefix and suffix are whole characters, the
 * literal starts and ends with ASCII, and the bytes the literal rules look at are ASCII); a
 * text whose prefix or suffix only decodes to them (bytes replaced) is a None, left to the
 * text's own skeleton_literal. */
static PyObject *
sockio_skeleton_literal_bytes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *base;
    Py_ssize_t start, stop, a, b;
    if (text_args("skeleton_literal_bytes", args, nargs, 6, &base, &start, &stop) < 0)
        return NULL;
    int string = PyObject_IsTrue(args[5]);
    if (string < 0)
        return NULL;
    const unsigned char *nul = memchr(base + start, 0, (size_t)(stop - start));
    if (nul != NULL)
        stop = nul - base;
    int framed = framed_by("skeleton_literal_bytes", base, start, stop, args[3], args[4], &a,
                           &b);
    if (framed < 0)
        return NULL;
    if (!framed)
        Py_RETURN_NONE;
    if (!string) {
        if (!all_digits(base, a, b))
            Py_RETURN_NONE;
        return digits_key(base, a, b);
    }
    Py_ssize_t last = b - 1; /* the closing quote */
    if (last <= a || base[a] != '\'' || base[last] != '\'')
        Py_RETURN_NONE;
    for (Py_ssize_t i = a + 1; i < last; i++) {
        unsigned char c = base[i];
        if (c < 58) {
            if (c == '\'' || c == '$' || c == '"')
                Py_RETURN_NONE;
            if ((c == '-' || c == '/') && i + 1 < last) {
                unsigned char d = base[i + 1];
                if ((c == '-' && d == '-') || (c == '/' && d == '*'))
                    Py_RETURN_NONE; /* the start of a comment */
            }
        }
        else if (c == '\\')
            Py_RETURN_NONE;
    }
    return PyUnicode_DecodeUTF8((const char *)base + a, b - a, "replace");
}

/* sketch_bump(counts, i): add one to the i-th native 64-bit count of the bytearray counts
 * (analysis.sketch: a latency bucket); False when i is out of range. */
static PyObject *
sockio_sketch_bump(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyByteArray_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "sketch_bump() takes (counts: bytearray, i: int)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= PyByteArray_GET_SIZE(args[0]) / 8)
        Py_RETURN_FALSE;
    char *cell = PyByteArray_AS_STRING(args[0]) + 8 * i;
    int64_t v;
    memcpy(&v, cell, sizeof v);
    v++;
    memcpy(cell, &v, sizeof v);
    Py_RETURN_TRUE;
}

/* same_at(data, start, other): whether data[start:start + len(other)] == other. */
static PyObject *
sockio_same_at(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "same_at() takes (data: bytes, start: int, other: bytes)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]), m = PyBytes_GET_SIZE(args[2]);
    if (start < 0 || start > n || n - start < m)
        Py_RETURN_FALSE;
    if (memcmp(PyBytes_AS_STRING(args[0]) + start, PyBytes_AS_STRING(args[2]), (size_t)m) != 0)
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* answer_scan(data): see conversation.answer_scan_at, its definition. */
static PyObject *
sockio_answer_scan(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "answer_scan() takes bytes");
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    Py_ssize_t pos = 0, tag_start = -1, tag_end = -1;
    long long rows = 0;
    while (pos < n) {
        if (n - pos < 5)
            return PyLong_FromLong(-1);
        unsigned char t = d[pos];
        Py_ssize_t len = ((Py_ssize_t)d[pos + 1] << 24) | ((Py_ssize_t)d[pos + 2] << 16)
                         | ((Py_ssize_t)d[pos + 3] << 8) | (Py_ssize_t)d[pos + 4];
        Py_ssize_t end = pos + 1 + len;
        if (len < 4 || end > n)
            return PyLong_FromLong(-1);
        if (t == 'D') {
            if (tag_start >= 0)
                return PyLong_FromLong(-1); /* a row after the statement's end */
            rows++;
        }
        else if (t == 'C') {
            if (tag_start >= 0 || len < 5 || d[end - 1] != 0)
                return PyLong_FromLong(-1);
            tag_start = pos + 5;
            tag_end = end - 1;
        }
        else if (t == 'Z') {
            if (tag_start < 0 || end != n || len != 5)
                return PyLong_FromLong(-1);
            /* The tag's row count (scan.command_tag_rows), from a run of at most 18 digits. */
            Py_ssize_t i = tag_end;
            while (i > tag_start && d[i - 1] >= '0' && d[i - 1] <= '9')
                i--;
            if (tag_end - i > 18)
                return PyLong_FromLong(-1);
            long long tag_rows = 0;
            if (i != tag_end && i != tag_start && d[i - 1] == ' ')
                for (; i < tag_end; i++)
                    tag_rows = tag_rows * 10 + (long long)(d[i] - '0');
            long long select = tag_end - tag_start >= 7 && memcmp(d + tag_start, "SELECT ", 7) == 0;
            if (tag_rows)
                return PyLong_FromLongLong((tag_rows << 2) | 2 | select);
            if (rows >= ((long long)1 << 60))
                return PyLong_FromLong(-1);
            return PyLong_FromLongLong((rows << 2) | select);
        }
        else if (be_needed[t])
            return PyLong_FromLong(-1); /* a message the general loop must read */
        pos = end;
    }
    return PyLong_FromLong(-1);
}

/* cstring(data, start, end): the string at data[start:] up to its NUL, decoded like text();
 * None when no NUL ends it before end. */
static PyObject *
sockio_cstring(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return decode_upto_nul("cstring", args, nargs, 1);
}

static PyMethodDef sockio_methods[] = {
    {"text", (PyCFunction)(void (*)(void))sockio_text, METH_FASTCALL,
     "text(data, start, end) -> str: data[start:end] up to its first NUL, decoded from UTF-8 "
     "(invalid bytes replaced)."},
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
     "same_but_digits(data, start, end, prefix, suffix) -> int | str | None: when "
     "data[start:end] is prefix, ASCII digits (one or more), suffix, their value key (as "
     "skeleton_literal gives it); else None."},
    {"cstring", (PyCFunction)(void (*)(void))sockio_cstring, METH_FASTCALL,
     "cstring(data, start, end) -> str | None: the string at data[start:] up to its NUL (before "
     "end), decoded as text() does; None without that NUL."},
    {"same_at", (PyCFunction)(void (*)(void))sockio_same_at, METH_FASTCALL,
     "same_at(data, start, other) -> bool: whether data[start:start + len(other)] == other "
     "(compared in place)."},
    {"unit_layout", (PyCFunction)(void (*)(void))sockio_unit_layout, METH_FASTCALL,
     "unit_layout(data, max_message) -> int: proxy.pinscan.unit_layout_at (the common "
     "extended-protocol unit's messages, packed), or -1."},
    {"answer_scan", (PyCFunction)sockio_answer_scan, METH_O,
     "answer_scan(data) -> int: wire.scan.answer_scan_at (a whole answer ending one "
     "statement: its rows and tag, packed), or -1."},
    {"skeleton_literal", (PyCFunction)(void (*)(void))sockio_skeleton_literal, METH_FASTCALL,
     "skeleton_literal(text, prefix, suffix, string) -> str | None: the literal between prefix "
     "and suffix when analysis.cache.same_skeleton(text, prefix, suffix, string), else None."},
    {"skeleton_literal_bytes", (PyCFunction)(void (*)(void))sockio_skeleton_literal_bytes,
     METH_FASTCALL,
     "skeleton_literal_bytes(data, start, stop, prefix, suffix, string) -> str | None: "
     "skeleton_literal of data[start:stop] decoded, answered on its bytes (None: ask the text)."},
    {"sketch_bump", (PyCFunction)(void (*)(void))sockio_sketch_bump, METH_FASTCALL,
     "sketch_bump(counts, i) -> bool: add one to the i-th native 64-bit count of counts "
     "(a bytearray); False when i is out of range."},
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
    init_be_needed();
    if (PyType_Ready(&PollerType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&sockio_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "RECV_SIZE", RECV_SIZE) < 0
            || PyModule_AddIntConstant(module, "MAX_EVENTS", MAX_EVENTS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&PollerType);
    if (PyModule_AddObject(module, "Poller", (PyObject *)&PollerType) < 0) {
        Py_DECREF(&PollerType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
