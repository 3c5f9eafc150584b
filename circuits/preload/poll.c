/*
 * poll.c - poll, ppoll, select, pselect: readiness of circuit sockets is
 * computed from ring state, never taken from the kernel's view of the
 * descriptor (a connected circuit's descriptor is its doorbell, which
 * says "rung", not "readable" or "writable").
 *
 * One loop serves all four calls:
 *   1. compute each connected circuit's readiness with circuit_poll();
 *      other descriptors (files, pipes, listeners, placeholders) are the
 *      kernel's business and go to the real ppoll as they are;
 *   2. if nothing is ready, arm each circuit (circuit_arm_read: its doorbell
 *      turns readable as soon as data or an end arrives; a refused
 *      non-blocking reserve of one byte makes room ring it too), look once
 *      more, then sleep in the real ppoll on the doorbells, the peers'
 *      doorbell ends (their hang-up is a peer's death) and the kernel's
 *      descriptors, with the caller's timeout and signal mask;
 *   3. on waking, go back to 1.
 * A signal handler interrupts the sleep with EINTR, as the kernel does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "preload.h"

#define ON_STACK 64
#define EMPTY_WAKES_BEFORE_NAP 3
#define PEER_ASK_NS 1000000 /* 1 ms */

bool cp_computed(struct cp_sock *s)
{
    int st = s ? __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) : -1;
    return st == CP_CONNECTED || st == CP_FAILED || st == CP_CONNECTING;
}

static bool connecting(struct cp_sock *s)
{
    return s && __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == CP_CONNECTING;
}

/* ask_kernel: also ask whether the peer vanished (a poll(2)); a caller that
 * watches the peer's hang-up itself passes false until it fires. */
short cp_revents(struct cp_sock *s, short events, bool ask_kernel)
{
    short r = 0;
    int st = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
    if (st == CP_FAILED)
        return (short)((POLLOUT | POLLERR | POLLHUP) & (events | POLLERR | POLLHUP));
    if (st == CP_CONNECTING)
        return 0; /* as a kernel socket's before its handshake ends */
    int m = ask_kernel ? circuit_poll(s->c) : circuit_poll_known(s->c);
    if (m & CIRCUIT_READABLE || s->rd_shut)
        r |= POLLIN | POLLRDNORM;
    if (m & CIRCUIT_WRITABLE && !s->wr_shut)
        r |= POLLOUT | POLLWRNORM;
    if (m & CIRCUIT_HANGUP || s->rd_shut)
        r |= POLLRDHUP;
    if (m & CIRCUIT_HANGUP && s->wr_shut)
        r |= POLLHUP; /* both directions over, as for a kernel socket */
    return (short)(r & (events | POLLHUP | POLLERR));
}

/* The caller has just asked the kernel about the peer (or watches its
 * hang-up): the look at the ring here needs no system call. */
void cp_arm(struct cp_sock *s, short events, bool edge)
{
    if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != CP_CONNECTED)
        return;
    if (edge)
        circuit_arm_edge(s->c);
    else
        circuit_arm_read(s->c);
    if ((events & POLLOUT) && !(circuit_poll_known(s->c) & CIRCUIT_WRITABLE)) {
        void *ptr; /* refused: the core records the room we wait for (tx_need) */
        circuit_reserve(s->c, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &ptr);
    }
}

/*
 * Whether to ask the kernel if s's peer vanished (a poll(2) of its doorbell
 * end): at most once per PEER_ASK_NS while the circuit is ready.  A program
 * that polls a busy circuit (iperf3's select before every read) paid a
 * system call per circuit per look for it.  A circuit that is not ready is
 * armed before we sleep, which asks the kernel, and the sleep watches the
 * peer's hang-up.
 */
bool cp_ask_due(struct cp_sock *s, int64_t now)
{
    int64_t last = __atomic_load_n(&s->peer_asked, __ATOMIC_RELAXED);
    if (now - last < PEER_ASK_NS && now >= last)
        return false;
    __atomic_store_n(&s->peer_asked, now, __ATOMIC_RELAXED);
    return true;
}

/* answered: the kernel said the control connection of each connecting
 * socket is readable (NULL: ask each at most once a millisecond). */
static int compute_all(struct pollfd *fds, struct cp_sock **socks, nfds_t n,
                       const struct pollfd *answered)
{
    int ready = 0;
    int64_t now = cp_now_ns();
    for (nfds_t i = 0; i < n; i++) {
        if (!cp_computed(socks[i]))
            continue;
        bool ask = cp_ask_due(socks[i], now);
        if (connecting(socks[i]) && (answered ? answered[i].revents != 0 : ask))
            cp_connect_settle(socks[i], false);
        if ((fds[i].revents = cp_revents(socks[i], fds[i].events, ask)))
            ready++;
    }
    return ready;
}

int64_t cp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t cp_deadline(struct cp_sock *s, bool sending)
{
    int64_t t = s->timeo_ns[sending];
    return t > 0 ? cp_now_ns() + t : CIRCUIT_FOREVER;
}

int cp_ms_until(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - cp_now_ns();
    return left <= 0 ? 0 : (int)((left + 999999) / 1000000);
}

static struct timespec left(int64_t deadline)
{
    int64_t ns = deadline - cp_now_ns();
    if (ns < 0)
        ns = 0;
    return (struct timespec){.tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL};
}

/*
 * The kernel's set: fds as they are, then (while waiting) each circuit's
 * doorbell (POLLIN) and its peer's doorbell end (hang-up only).
 */
static nfds_t kernel_set(struct pollfd *k, const struct pollfd *fds, struct cp_sock **socks,
                         nfds_t n, bool wait)
{
    nfds_t extra = n;
    for (nfds_t i = 0; i < n; i++) {
        k[i] = fds[i];
        k[i].revents = 0;
        if (!cp_computed(socks[i]))
            continue;
        bool connected = __atomic_load_n(&socks[i]->state, __ATOMIC_ACQUIRE) == CP_CONNECTED;
        /* The circuit's own doorbell, not the number's file: a UDP socket
         * re-connected through another of its numbers, or a connect that
         * completed after the program closed the number it connected on. */
        int bell = connected ? circuit_bell(socks[i]->c) : -1;
        if (connecting(socks[i]))
            bell = socks[i]->pending; /* the operator's answer comes there */
        k[i].fd = wait ? bell : -1;
        k[i].events = POLLIN;
        if (wait && connected)
            k[extra++] = (struct pollfd){.fd = socks[i]->peer_bell, .events = 0};
    }
    return extra;
}

/* What the kernel said of a descriptor it polls.  A UDP server's is our
 * epoll of its peers: it also wakes for a peer that left or a new peer
 * with nothing sent yet; readable only if a receive would not wait. */
static short kernel_revents(struct cp_sock *s, short re)
{
    if (s && s->dgram && (re & POLLIN) &&
        __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == CP_LISTENING &&
        !cp_udp_server_pending(s))
        re &= (short)~(POLLIN | POLLRDNORM);
    return re;
}

/* Sleep until something may be ready; 0, or -errno (EINTR). */
static int kernel_poll(struct pollfd *k, nfds_t total, int64_t deadline, const sigset_t *mask)
{
    struct timespec ts = deadline < 0 ? (struct timespec){0, 0} : left(deadline);
    int rc = real.ppoll(k, total, deadline < 0 ? NULL : &ts, mask);
    return rc < 0 ? -errno : rc;
}

/* Does the kernel have a descriptor of its own to answer for?  If not, a
 * call that does not sleep needs no ppoll (iperf3's client selects on two
 * circuits before every write). */
static bool any_kernel_fd(const struct pollfd *fds, struct cp_sock **socks, nfds_t n)
{
    for (nfds_t i = 0; i < n; i++)
        if (fds[i].fd >= 0 && !cp_computed(socks[i]))
            return true;
    return false;
}

struct look {
    struct pollfd *fds;
    struct cp_sock **socks;
    nfds_t n;
};

static bool any_ready(void *arg)
{
    struct look *l = arg;
    return compute_all(l->fds, l->socks, l->n, NULL) > 0;
}

/*
 * How long to sleep: until deadline, or CONNECT_LOOK_NS at most while a
 * connect is in flight.  Its answer wakes us, unless another thread takes
 * it first (a send, getsockopt): the kernel looks again at the control
 * connection on waking, finds it drained, and would sleep on.
 */
#define CONNECT_LOOK_NS 100000000 /* 100 ms */

static bool any_connecting(struct cp_sock **socks, nfds_t n)
{
    for (nfds_t i = 0; i < n; i++)
        if (connecting(socks[i]))
            return true;
    return false;
}

/* was: a socket was connecting when we last looked at the rings.  Another
 * thread may have settled it since, after kernel_set chose what to sleep on
 * (the drained control connection, or a doorbell a writable circuit never
 * rings): the cap still holds for this sleep. */
static int64_t sleep_until(struct cp_sock **socks, nfds_t n, int64_t deadline, bool was)
{
    if (!was && !any_connecting(socks, n))
        return deadline;
    int64_t soon = cp_now_ns() + CONNECT_LOOK_NS;
    return deadline < 0 || soon < deadline ? soon : deadline;
}

static int poll_loop(struct pollfd *fds, struct cp_sock **socks, struct pollfd *k, nfds_t n,
                     int64_t deadline, const sigset_t *mask)
{
    struct look look = {fds, socks, n};
    for (int empty = 0;; empty++) {
        bool wait = deadline != 0 && compute_all(fds, socks, n, NULL) == 0;
        if (wait && !empty && cp_spin(any_ready, &look, deadline))
            wait = false; /* ready: the kernel's descriptors are looked at without waiting */
        bool was_connecting = false;
        if (wait) {
            for (nfds_t i = 0; i < n; i++)
                if (cp_computed(socks[i]))
                    cp_arm(socks[i], fds[i].events, false);
            was_connecting = any_connecting(socks, n); /* before the look that decides */
            wait = compute_all(fds, socks, n, NULL) == 0;
        }
        bool expired = deadline >= 0 && cp_now_ns() >= deadline;
        nfds_t total = kernel_set(k, fds, socks, n, wait && !expired);
        bool ask = (wait && !expired) || mask || any_kernel_fd(fds, socks, n);
        int64_t until = wait && !expired ? sleep_until(socks, n, deadline, was_connecting) : 0;
        int rc = ask ? kernel_poll(k, total, until, mask) : 0;
        if (rc < 0)
            return rc;
        int ready = compute_all(fds, socks, n, ask ? k : NULL);
        for (nfds_t i = 0; i < n; i++)
            if (!cp_computed(socks[i]) && (fds[i].revents = kernel_revents(socks[i], k[i].revents)))
                ready++;
        if (ready || !wait || expired || (deadline >= 0 && cp_now_ns() >= deadline))
            return ready;
        /* A doorbell that another of our threads sleeps on stays rung (the
         * core does not drain it under a sleeper): do not spin on it. */
        if (empty >= EMPTY_WAKES_BEFORE_NAP)
            usleep(1000);
    }
}

/* poll, ppoll: deadline -1 waits for ever; mask as for ppoll. */
static int poll_common(struct pollfd *fds, nfds_t n, int64_t deadline, const sigset_t *mask)
{
    bool any = false;
    for (nfds_t i = 0; i < n && !any; i++)
        any = cp_fd_maybe(fds[i].fd);
    if (!any) {
        struct timespec ts = left(deadline);
        return real.ppoll(fds, n, deadline < 0 ? NULL : &ts, mask);
    }
    struct cp_sock *socks_stack[ON_STACK], **socks = socks_stack;
    struct pollfd k_stack[2 * ON_STACK], *k = k_stack;
    if (n > ON_STACK) {
        socks = calloc(n, sizeof(*socks));
        k = calloc(2 * n, sizeof(*k));
        if (!socks || !k) {
            free(socks), free(k);
            errno = ENOMEM;
            return -1;
        }
    }
    for (nfds_t i = 0; i < n; i++)
        socks[i] = cp_fd_get(fds[i].fd);
    int rc = poll_loop(fds, socks, k, n, deadline, mask);
    for (nfds_t i = 0; i < n; i++)
        cp_sock_put(socks[i]);
    if (n > ON_STACK)
        free(socks), free(k);
    return (int)cp_ret(rc);
}

static int64_t deadline_ms(int timeout)
{
    return timeout < 0 ? -1 : cp_now_ns() + (int64_t)timeout * 1000000LL;
}

static int64_t deadline_ts(const struct timespec *ts)
{
    if (!ts)
        return -1;
    return cp_now_ns() + (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

CP_EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    cp_init();
    bool any = false;
    for (nfds_t i = 0; i < n && !any; i++)
        any = cp_fd_maybe(fds[i].fd);
    if (!any) /* the common case, and the ring core's own sleeps: no clock read */
        return real.poll(fds, n, timeout);
    return poll_common(fds, n, deadline_ms(timeout), NULL);
}

CP_EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
    cp_init();
    return poll_common(fds, n, deadline_ts(ts), mask);
}

CP_EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
    if (fdslen / sizeof(*fds) < n)
        abort();
    return poll(fds, n, timeout);
}

CP_EXPORT int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *ts,
                          const sigset_t *mask, size_t fdslen)
{
    if (fdslen / sizeof(*fds) < n)
        abort();
    return ppoll(fds, n, ts, mask);
}

/* ---- select and pselect, by way of poll ------------------------------- */

static bool select_has_circuit(int nfds, fd_set *r, fd_set *w, fd_set *e)
{
    for (int fd = 0; fd < nfds; fd++)
        if (((r && FD_ISSET(fd, r)) || (w && FD_ISSET(fd, w)) || (e && FD_ISSET(fd, e))) &&
            cp_fd_maybe(fd))
            return true;
    return false;
}

static int select_common(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t deadline,
                         const sigset_t *mask)
{
    struct pollfd fds[FD_SETSIZE];
    nfds_t n = 0;
    for (int fd = 0; fd < nfds; fd++) {
        short ev = (short)((r && FD_ISSET(fd, r) ? POLLIN : 0) | (w && FD_ISSET(fd, w) ? POLLOUT : 0) |
                           (e && FD_ISSET(fd, e) ? POLLPRI : 0));
        if (ev)
            fds[n++] = (struct pollfd){.fd = fd, .events = ev};
    }
    int rc = poll_common(fds, n, deadline, mask);
    if (rc < 0)
        return rc;
    int count = 0;
    for (nfds_t i = 0; i < n; i++) {
        int fd = fds[i].fd;
        short re = fds[i].revents;
        if (re & POLLNVAL) {
            errno = EBADF;
            return -1;
        }
#define MARK(set, bits)                         \
        if (set && FD_ISSET(fd, set)) {         \
            if (re & (bits))                    \
                count++;                        \
            else                                \
                FD_CLR(fd, set);                \
        }
        MARK(r, POLLIN | POLLHUP | POLLERR)
        MARK(w, POLLOUT | POLLERR)
        MARK(e, POLLPRI)
#undef MARK
    }
    return count;
}

/* The time left, as Linux's select reports it. */
static void time_left(struct timeval *tv, int64_t deadline)
{
    struct timespec ts = left(deadline);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
}

CP_EXPORT int select(int nfds, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
    cp_init();
    if (nfds < 0 || nfds > FD_SETSIZE || !select_has_circuit(nfds, r, w, e))
        return real.select(nfds, r, w, e, tv);
    int64_t deadline = tv ? cp_now_ns() + (int64_t)tv->tv_sec * 1000000000LL + tv->tv_usec * 1000LL : -1;
    int rc = select_common(nfds, r, w, e, deadline, NULL);
    if (tv)
        time_left(tv, deadline);
    return rc;
}

CP_EXPORT int pselect(int nfds, fd_set *r, fd_set *w, fd_set *e, const struct timespec *ts,
                      const sigset_t *mask)
{
    cp_init();
    if (nfds < 0 || nfds > FD_SETSIZE || !select_has_circuit(nfds, r, w, e))
        return real.pselect(nfds, r, w, e, ts, mask);
    return select_common(nfds, r, w, e, deadline_ts(ts), mask);
}
