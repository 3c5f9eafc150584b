/*
 * connect.c - connect(): a CONNECT to the operator, in flight until its
 * answer comes.
 *
 * The operator answers a CONNECT to another guest at once, but one to the
 * outside only once the proxy stack's host connection is up: a whole TCP
 * handshake later.  So a connect is two steps, as the kernel's:
 *
 *   start    sends CONNECT on a control connection of the pool, which the
 *            socket keeps (s->pending) until the answer is in: the socket is
 *            CP_CONNECTING.  Its descriptor keeps the placeholder; poll and
 *            epoll watch the control connection instead, which turns
 *            readable when the answer arrives.
 *   settle   takes the answer, attaches the circuit and puts its doorbell
 *            on the program's number (CP_CONNECTED), or records the errno
 *            for SO_ERROR (CP_FAILED); the control connection goes back to
 *            the pool.  Whoever comes first settles: poll or epoll seeing
 *            the answer, a send or receive, getsockopt, connect again.
 *
 * A blocking connect starts and waits for the answer at once (a signal
 * handler cuts the wait short with EINTR, the CONNECT still in flight, as
 * the kernel's); a non-blocking one starts and says EINPROGRESS.  Either
 * way, epoll registrations follow the socket from one descriptor to the
 * next (cp_epoll_follow).  A socket closed while its CONNECT is in flight takes
 * the answer if it is there and closes that circuit, or closes the control
 * connection, whose answer the operator then cannot deliver: it drops that
 * connection, and the circuit with it.  fork() first waits for the answers
 * of connects in flight (pthread_atfork, fork.c), so parent and child find
 * the same circuit, as they would share a kernel socket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "preload.h"

static int in_flight; /* sockets with a CONNECT in flight (atomic): fork waits for them */

static int state_of(struct cp_sock *s) { return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE); }

/* Errors that leave a pooled control connection fit for the next CONNECT. */
static bool answered(int err)
{
    return err != -EPROTO && err != -ETIMEDOUT && err != -ECONNABORTED && err != -EINTR;
}

/* Send CONNECT on a pooled connection (another one if the pooled one is to an
 * operator since restarted); *ctl and *request on success, else -errno. */
static int send_connect(const struct cp_endpoint *ep, int *ctl, uint32_t *request)
{
    int fd = cp_ctl_get();
    if (fd < 0)
        return cp_unreachable(fd);
    int err = cp_ctl_send_connect(fd, ep, request);
    if (err == -ECONNABORTED) {
        cp_ctl_put(fd, false);
        if ((fd = cp_ctl_open()) < 0)
            return cp_unreachable(fd);
        err = cp_ctl_send_connect(fd, ep, request);
    }
    if (err) {
        cp_ctl_put(fd, false);
        return err == -ECONNABORTED ? cp_unreachable(err) : err;
    }
    *ctl = fd;
    return 0;
}

/* The answer, if it came (or once it comes: wait); -EINTR if a signal
 * handler ran while waiting: the answer is still to come on ctl.  *healthy:
 * ctl is fit for the next CONNECT (told before the operator's leaving, which
 * leaves it dead, becomes ENETUNREACH). */
static int answer(int ctl, uint32_t request, bool wait, struct cp_circuit_msg *m, int fds[4],
                  bool *healthy)
{
    int err = cp_ctl_recv_connect(ctl, request, wait, m, fds);
    *healthy = answered(err);
    return err == -ECONNABORTED ? cp_unreachable(err) : err; /* the operator left with it */
}

int cp_ask_circuit(const struct cp_endpoint *ep, uint32_t kind, struct cp_circuit_msg *m,
                   int fds[4], struct circuit **c)
{
    int ctl;
    uint32_t request;
    int err = send_connect(ep, &ctl, &request);
    if (err)
        return err;
    bool healthy;
    while ((err = answer(ctl, request, true, m, fds, &healthy)) == -EINTR)
        ; /* a UDP connect or a server's new peer: answered at once, never in flight */
    cp_ctl_put(ctl, healthy);
    return err ? err : cp_ctl_attach(m, fds, 0, kind, c);
}

/* Send CONNECT for s (s->lock held): it is CP_CONNECTING from now on. */
static int start(int fd, struct cp_sock *s, const struct cp_endpoint *ep)
{
    int err = send_connect(ep, &s->pending, &s->request);
    if (err)
        return err;
    s->fd = fd, s->remote = *ep;
    s->procs = cp_procs_new(); /* now: fork counts the process in before it settles (fork.c) */
    __atomic_add_fetch(&in_flight, 1, __ATOMIC_ACQ_REL);
    __atomic_store_n(&s->state, CP_CONNECTING, __ATOMIC_RELEASE);
    cp_epoll_follow(s); /* epoll watches the control connection for the answer */
    return 0;
}

/* The circuit on s; its doorbell on the number the program connected, if
 * that number is still this socket's (it may have closed it, keeping a dup). */
static int install(struct cp_sock *s, const struct cp_circuit_msg *m, int fds[4])
{
    struct circuit *c;
    int err = cp_ctl_attach(m, fds, 0, s->dgram ? CIRCUIT_DGRAM : CIRCUIT_STREAM, &c);
    if (!err && (err = cp_fd_put_file(s->fd, s, fds[1])))
        circuit_free(c);
    if (err)
        return err;
    s->c = c, s->peer_bell = fds[3], s->circuit_id = m->id;
    s->local = m->local, s->remote = m->remote;
    __atomic_store_n(&s->state, CP_CONNECTED, __ATOMIC_RELEASE);
    return 0;
}

/*
 * Take the answer of s's CONNECT (s->lock held); -EAGAIN if it has not come
 * and !wait, -EINTR if a signal handler ran while waiting (s is still
 * connecting, as a kernel socket whose blocking connect a signal cut short).
 * A failure is the caller's to report (`report`: a blocking connect; s is
 * fresh again) or SO_ERROR's (s is CP_FAILED).
 */
static int finish(struct cp_sock *s, bool wait, bool report)
{
    struct cp_circuit_msg m;
    int fds[4];
    bool healthy;
    int err = answer(s->pending, s->request, wait, &m, fds, &healthy);
    if (err == -EAGAIN || err == -EINTR)
        return err;
    if (!err)
        err = install(s, &m, fds);
    if (err) {
        cp_procs_leave(s);
        if (!report)
            s->so_error = -err;
        __atomic_store_n(&s->state, report ? CP_FRESH : CP_FAILED, __ATOMIC_RELEASE);
    }
    cp_epoll_follow(s); /* off the control connection, onto the doorbell */
    cp_ctl_put(s->pending, healthy);
    s->pending = -1;
    __atomic_sub_fetch(&in_flight, 1, __ATOMIC_ACQ_REL);
    char a[CP_EP_STR];
    if (!s->dgram)
        cp_log("fd %d: connect to %s: %s, circuit %llu", s->fd, cp_endpoint_str(&s->remote, a),
               err ? strerror(-err) : "connected", (unsigned long long)s->circuit_id);
    return report ? err : 0;
}

int cp_connect_settle(struct cp_sock *s, bool wait)
{
    if (state_of(s) != CP_CONNECTING)
        return 0;
    if (wait)
        pthread_mutex_lock(&s->lock);
    else if (pthread_mutex_trylock(&s->lock))
        return -EAGAIN; /* another thread is settling it, or connecting */
    int err = state_of(s) == CP_CONNECTING ? finish(s, wait, false) : 0;
    pthread_mutex_unlock(&s->lock);
    return err;
}

int cp_connect_circuit(int fd, struct cp_sock *s, const struct cp_endpoint *ep)
{
    int err = start(fd, s, ep);
    while (!err && (err = finish(s, true, true)) == -EINTR)
        ; /* UDP (udp.c): its connect returns at once, the answer is at once too */
    return err;
}

void cp_connect_abandon(struct cp_sock *s)
{
    if (s->pending < 0)
        return;
    struct cp_circuit_msg m;
    int fds[4];
    struct circuit *c;
    int err = cp_ctl_recv_connect(s->pending, s->request, false, &m, fds);
    if (!err && !cp_ctl_attach(&m, fds, 0, s->dgram ? CIRCUIT_DGRAM : CIRCUIT_STREAM, &c))
        circuit_free(c); /* never used: the peer reads end of data */
    /* Not come yet: its connection goes, and the answer cannot be delivered. */
    cp_ctl_put(s->pending, err != -EAGAIN && answered(err));
    s->pending = -1;
    cp_procs_leave(s);
    __atomic_sub_fetch(&in_flight, 1, __ATOMIC_ACQ_REL);
    char a[CP_EP_STR];
    cp_log("connect to %s: closed in flight (%s)", cp_endpoint_str(&s->remote, a),
           err == -EAGAIN ? "no answer yet" : err ? strerror(-err) : "its circuit closed");
}

/* ---- fork ------------------------------------------------------------- */

static void settle_one(int fd, struct cp_sock *s, void *arg)
{
    (void)fd, (void)arg;
    while (cp_connect_settle(s, true) == -EINTR)
        ;
}

void cp_connect_settle_all(void)
{
    if (__atomic_load_n(&in_flight, __ATOMIC_ACQUIRE))
        cp_fd_each(settle_one, NULL);
}

/* ---- connect() ---------------------------------------------------------- */

/* A TCP socket's connect (s->lock held): 0, -EINPROGRESS or -errno. */
static int connect_stream(int fd, struct cp_sock *s, const struct cp_endpoint *ep)
{
    bool nonblock = __atomic_load_n(&s->nonblock, __ATOMIC_RELAXED);
    switch (state_of(s)) {
    case CP_CONNECTED:
        return -EISCONN;
    case CP_LISTENING:
        return -EINVAL;
    case CP_CONNECTING:
        if (!nonblock)
            return finish(s, true, true);
        if (finish(s, false, false) == -EAGAIN)
            return -EALREADY;
        if (state_of(s) == CP_CONNECTED)
            return 0; /* the kernel's: the connect that finds the handshake done says 0 */
        __attribute__((fallthrough)); /* it failed: this connect reports it */
    case CP_FAILED: { /* the kernel's second connect reports the failure, then tries anew */
        int err = __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL);
        __atomic_store_n(&s->state, CP_FRESH, __ATOMIC_RELEASE);
        if (err)
            return -err;
    }
    }
    int err = start(fd, s, ep);
    if (err) {
        char a[CP_EP_STR];
        cp_log("fd %d: connect to %s: %s", fd, cp_endpoint_str(ep, a), strerror(-err));
        if (!nonblock)
            return err;
        s->so_error = -err; /* told by SO_ERROR, as the kernel's */
        __atomic_store_n(&s->state, CP_FAILED, __ATOMIC_RELEASE);
        cp_epoll_follow(s);
        return -EINPROGRESS;
    }
    return nonblock ? -EINPROGRESS : finish(s, true, true);
}

CP_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.connect(fd, addr, len);
    int rc;
    bool bypass;
    if (s->dgram) {
        rc = cp_udp_connect(fd, s, addr, len);
        bypass = rc == CP_HAND_BACK;
    } else {
        struct cp_endpoint ep;
        rc = cp_endpoint_from(addr, len, s->family, &ep);
        bypass = !rc && cp_bypassed(&ep);
        if (!rc && !bypass) {
            pthread_mutex_lock(&s->lock);
            rc = connect_stream(fd, s, &ep);
            pthread_mutex_unlock(&s->lock);
        }
    }
    cp_sock_put(s);
    if (bypass) {
        cp_hand_back(fd, "connect to a CIRCUITS_BYPASS address");
        return real.connect(fd, addr, len);
    }
    return (int)cp_ret(rc);
}
