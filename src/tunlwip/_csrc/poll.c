/*
 * The poll set: one epoll set holding the packet device, every relay's upstream socket and
 * Python's watched fds, served in C (tl_relay_poll), and the loop that waits on it while the
 * event loop is idle (tl_relay_run).
 *
 * Theory of operation
 * -------------------
 * Two epoll sets hold the same registrations (tl_poll_ctl makes every ADD, MOD and DEL on
 * both, with the same epoll data): the poll set (tl_relay_epoll_fd) and the wait set.
 *  - Python's poll task waits for the poll set to be readable with trio (trio's epoll set holds
 *    it) and calls tl_relay_poll, which takes its events with a non-blocking epoll_wait.
 *  - While trio has nothing else to do, the task calls tl_relay_run instead: it blocks in one
 *    epoll_wait on the wait set, which also holds (a duplicate of) trio's epoll fd, tagged
 *    TL_LOOP_TAG (tl_relay_wait_with), serves the events it returned directly, runs lwIP's due
 *    timers, and returns only when Python is needed or trio's fd turned readable. The poll set
 *    cannot hold trio's fd (trio's set holds the poll set: the kernel refuses cycles); a wait
 *    set holding the poll set would cost a second epoll_wait per wakeup, on the poll set.
 * Either way one round (tl_poll_serve) reads a batch of the device's packets (tl_input_fd),
 * reports Python watchers (tl_py_fd_ready) and hands each relay its events (relay.c), all inside
 * one output batch, so a connection's segments of a round leave in one write (vnet.c). The epoll
 * data tells them apart: TL_INPUT_TAG for the device, a token with the low bit set for a
 * watcher, otherwise a pointer to a struct that begins with a struct tl_poll_entry naming its
 * kind (a relay, ...).
 *
 * Invariants: single-threaded (the trio thread); a round's events come from one epoll_wait on
 * one of the two sets, and both are level-triggered, so an fd served from one set is not
 * reported again by the other unless it is still ready (the kernel re-checks readiness); ended
 * relays are freed only after a round (tl_relay_bury), as a later event of the same round may
 * name them; an fd is in both sets or in neither (a failed ADD or MOD takes it out of both); an
 * fd is taken out (DEL) before it is closed, as another fd of its file (a dup, a forked child's
 * copy) would keep its registrations, naming freed memory;
 * trio's set disarms the poll set (EPOLLONESHOT) once reported, so while tl_relay_run waits, the
 * poll set's readiness does not make trio's fd readable; any call into Python
 * (tl_python_calls) makes tl_relay_run hand control back after that pass.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>

#include "tl_internal.h"

/* Calls into Python so far. Python has work queued after one (a task woken, a packet to
 * send), so the poll loop in C (tl_relay_run) hands control back after a pass that made one. */
uint64_t tl_python_calls;

int tl_epoll_fd = -1;
int tl_polling; /* inside a round (tl_poll_serve) */
static int tl_poll_input = -1;    /* the device fd read by tl_relay_poll, or -1 */
static int tl_poll_input_err;     /* errno that made it stop reading the device */

#define TL_INPUT_TAG 1u           /* epoll data of the device fd: watcher token 0 */
#define TL_INPUT_BATCH 64

/* Reading the device until EAGAIN costs a read that finds nothing, per wakeup, when packets
 * come one at a time (request/response, a connection's handshake). So the C loop reads one
 * packet per round after a batch that held just one (tl_input_single): the level-triggered
 * wait set reports the device again if more was queued. A device event in the round right
 * after such a single read (tl_input_probed) means packets come faster: read a whole batch. */
static int tl_input_single;
static int tl_input_probed;

/* What tl_relay_run waits on: the wait set. It holds every fd of the poll set too (same epoll
 * data: tl_poll_ctl registers each in both) and, while the C loop may run, the event loop's epoll
 * fd (TL_LOOP_TAG). The loop's set contains the poll set, so the poll set cannot contain it back
 * (the kernel refuses cycles): hence a second set, and one epoll_wait per wakeup instead of a
 * wait on a set holding both and then one on the poll set. */
static int tl_wait_epoll_fd = -1;
static int tl_loop_fd = -1; /* our duplicate of the event loop's epoll fd, in the wait set */

#define TL_LOOP_TAG 2u /* epoll data of the loop's fd: even, and no pointer is 2 */

int tl_relay_epoll_fd(void)
{
    if (tl_epoll_fd < 0) {
        int poll_set = epoll_create1(EPOLL_CLOEXEC);
        if (poll_set < 0) return -errno;
        int wait_set = epoll_create1(EPOLL_CLOEXEC);
        if (wait_set < 0) {
            int err = errno;
            close(poll_set);
            errno = err;
            return -err;
        }
        tl_epoll_fd = poll_set;
        tl_wait_epoll_fd = wait_set;
    }
    return tl_epoll_fd;
}

/* epoll_ctl on the poll set and the wait set alike: 0, or -1 with errno. A failed ADD or MOD
 * leaves the fd in neither set (the caller treats it as not watched); DEL removes it from both
 * (its result is the poll set's). */
int tl_poll_ctl(int op, int fd, struct epoll_event *ev)
{
    if (op != EPOLL_CTL_DEL && epoll_ctl(tl_epoll_fd, op, fd, ev) == 0 &&
        epoll_ctl(tl_wait_epoll_fd, op, fd, ev) == 0)
        return 0;
    int err = errno;
    int rc = epoll_ctl(tl_epoll_fd, EPOLL_CTL_DEL, fd, NULL);
    if (op == EPOLL_CTL_DEL) err = errno;
    epoll_ctl(tl_wait_epoll_fd, EPOLL_CTL_DEL, fd, NULL);
    errno = err;
    return op == EPOLL_CTL_DEL ? rc : -1;
}

/* Serve one round of events, from either set: a batch of the device's packets, Python
 * watchers, relays and dials, all inside one output batch; ended relays are freed after it. */
static void tl_poll_serve(const struct epoll_event *events, int n, int in_c_loop)
{
    int probed = tl_input_probed;
    tl_input_probed = 0;
    tl_polling = 1;
    tl_output_batch_begin(); /* a pass's segments of a connection leave in one write */
    for (int i = 0; i < n; i++) {
        if (events[i].data.u64 == TL_INPUT_TAG) { /* the device: a batch of client packets */
            int single = in_c_loop && tl_input_single && !probed;
            int got = tl_input_fd(tl_poll_input, single ? 1 : TL_INPUT_BATCH);
            tl_input_probed = single;
            if (!single) tl_input_single = got <= 1;
            if (got < 0) {
                tl_poll_set_input(-1);
                tl_poll_input_err = -got; /* reported once: the next set_input clears it */
            }
            continue;
        }
        if (events[i].data.u64 & 1) { /* a Python watcher (tl_watch_add), not a relay */
            TL_PY(tl_py_fd_ready((uintptr_t)(events[i].data.u64 >> 1)));
            continue;
        }
        struct tl_poll_entry *entry = events[i].data.ptr;
        switch (entry->kind) {
        case TL_POLL_RELAY:
            tl_relay_on_ready((struct tl_relay *)entry, events[i].events);
            break;
        case TL_POLL_UDP_RELAY:
            tl_udp_relay_on_ready((struct tl_udp_relay *)entry, events[i].events);
            break;
        case TL_POLL_DIAL:
            tl_dial_on_ready((struct tl_dial *)entry, events[i].events);
            break;
        default:
            abort(); /* a pointer we never put in the set */
        }
    }
    tl_output_batch_end();
    tl_relay_bury();
    tl_udp_relay_bury();
    tl_polling = 0;
    tl_dial_expire();
}

int tl_relay_poll(int max_events)
{
    struct epoll_event events[256];
    if (tl_epoll_fd < 0) return 0;
    if (max_events > 256) max_events = 256;
    int n = epoll_wait(tl_epoll_fd, events, max_events, 0);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    tl_poll_serve(events, n, 0);
    return n;
}

/* Let the C loop also wake for the event loop's epoll fd (one per run; -1: the stack stops).
 * The wait set keeps a duplicate of it, so taking it out again never names another file. */
int tl_relay_wait_with(int loop_fd)
{
    if (tl_epoll_fd < 0) return -EBADF;
    if (tl_loop_fd >= 0) {
        epoll_ctl(tl_wait_epoll_fd, EPOLL_CTL_DEL, tl_loop_fd, NULL); /* the loop may live on */
        close(tl_loop_fd);
        tl_loop_fd = -1;
    }
    if (loop_fd < 0) return 0;
    int fd = fcntl(loop_fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return -errno;
    struct epoll_event loop = {.events = EPOLLIN, .data.u64 = TL_LOOP_TAG};
    if (epoll_ctl(tl_wait_epoll_fd, EPOLL_CTL_ADD, fd, &loop) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    tl_loop_fd = fd;
    return 0;
}

/* Block on the wait set until something is ready or timeout_ms passed, and serve it: returns
 * 0 (served, or nothing came), 1 if the event loop's fd is ready too (served the rest first),
 * or -errno (-EINTR for a signal). */
static int tl_relay_wait(int timeout_ms)
{
    struct epoll_event events[256];
    int n = epoll_wait(tl_wait_epoll_fd, events, 256, timeout_ms);
    if (n < 0) return -errno;
    int loop = 0;
    for (int i = 0; i < n; i++)
        if (events[i].data.u64 == TL_LOOP_TAG) { /* at most one: take it out of the round */
            events[i] = events[--n];
            loop = 1;
            break;
        }
    if (n > 0) tl_poll_serve(events, n, 1);
    return loop;
}

static double tl_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The poll loop, in C, for as long as the event loop has nothing else to do: wait for the
 * poll set or the event loop's epoll set (tl_relay_wait_with), serve what is ready, run
 * lwIP's due timers, and go on, so a packet costs a few syscalls and no Python. lwIP's clock follows
 * CLOCK_MONOTONIC as Python sets it: clock_base_ms at clock_origin (seconds, CLOCK_MONOTONIC).
 * Returns to Python when it is needed: a pass called into it (TL_RUN_PYTHON), the event loop
 * has I/O (TL_RUN_LOOP), timeout_ms passed (TL_RUN_TIMEOUT), a signal came (TL_RUN_SIGNAL),
 * the device failed (TL_RUN_PYTHON: tl_poll_input_error says why), or -errno. */
int tl_relay_run(int timeout_ms, uint32_t clock_base_ms, double clock_origin)
{
    if (tl_loop_fd < 0) return -EBADF;
    uint64_t calls = tl_python_calls;
    double end = tl_monotonic() + timeout_ms / 1000.0;
    for (int pass = 0; pass < TL_RUN_PASSES; pass++) {
        double now = tl_monotonic();
        tl_set_now(clock_base_ms + (uint32_t)(int64_t)((now - clock_origin) * 1000.0));
        if (tl_sleeptime() == 0) tl_check_timeouts();
        if (tl_python_calls != calls || tl_poll_input_err != 0) return TL_RUN_PYTHON;
        double left_ms = (end - now) * 1000.0;
        if (left_ms <= 0) return TL_RUN_TIMEOUT;
        uint32_t wait = left_ms < 1.0 ? 1u : (uint32_t)left_ms;
        uint32_t lwip_due = tl_sleeptime();
        if (lwip_due < wait) wait = lwip_due;
        uint32_t dial_due = tl_dial_expire(); /* and the C dials' deadlines */
        if (tl_python_calls != calls) return TL_RUN_PYTHON;
        if (dial_due < wait) wait = dial_due ? dial_due : 1;
        int loop = tl_relay_wait((int)wait);
        if (loop == -EINTR) return TL_RUN_SIGNAL;
        if (loop < 0) return loop;
        if (loop) return TL_RUN_LOOP;
    }
    return TL_RUN_PYTHON; /* a long busy stretch: let Python look around now and then */
}

/* Python watchers share the poll set: readiness of fd (level-triggered; readable, or writable
 * as a connect() in progress finishing) is reported as tl_py_fd_ready(token), from
 * tl_relay_poll. Tokens are tagged with the low bit, which no relay pointer has. Remove a
 * watcher before closing its fd. */
int tl_watch_add(int fd, uintptr_t token, int writable)
{
    if (tl_relay_epoll_fd() < 0) return -errno;
    struct epoll_event ev = {.events = writable ? EPOLLOUT : EPOLLIN,
                             .data.u64 = ((uint64_t)token << 1) | 1};
    return tl_poll_ctl(EPOLL_CTL_ADD, fd, &ev) == 0 ? 0 : -errno;
}

int tl_watch_del(int fd)
{
    if (tl_epoll_fd < 0) return 0;
    return tl_poll_ctl(EPOLL_CTL_DEL, fd, NULL) == 0 ? 0 : -errno;
}

/* Read the packet device from the poll set too: one wakeup of the poll task then serves the
 * device and every relay (fd -1: stop). Returns 0 or -errno. */
int tl_poll_set_input(int fd)
{
    if (tl_relay_epoll_fd() < 0) return -errno;
    if (tl_poll_input >= 0) tl_poll_ctl(EPOLL_CTL_DEL, tl_poll_input, NULL);
    tl_poll_input = -1;
    tl_poll_input_err = 0;
    if (fd < 0) return 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TL_INPUT_TAG};
    if (tl_poll_ctl(EPOLL_CTL_ADD, fd, &ev) != 0) return -errno;
    tl_poll_input = fd;
    return 0;
}

/* Why the poll set stopped reading the device (an errno), or 0. */
int tl_poll_input_error(void) { return tl_poll_input_err; }
