/*
 * socket.c - the life of a circuit socket: socket, bind, listen, accept,
 * shutdown, close, dup, fcntl, ioctl, names and options (connect: connect.c).
 *
 * socket(AF_INET or AF_INET6, SOCK_STREAM) makes a real kernel socket of
 * that family as a placeholder and records it in the table (fdtable.c).
 * Until it connects or listens, options go to the placeholder too, so
 * getsockopt and a hand-back to the kernel (CIRCUITS_BYPASS) find them set.
 *
 *   connect  asks the operator for a circuit and dup3()s its doorbell onto
 *            the program's descriptor (connect.c): same number, same
 *            close-on-exec, O_NONBLOCK as set.
 *   listen   opens the socket's own control connection, LISTENs, sends one
 *            ACCEPT, and dup3()s an epoll instance holding the connection
 *            onto the program's descriptor: it polls readable when the
 *            ACCEPT's reply is in.  The epoll stays while the connection
 *            may change: if the operator restarts, accept listens again on
 *            a new connection, and the program's poll and epoll
 *            registrations, which are of the epoll's file, still hold.
 *   accept   takes that reply, sends the next ACCEPT (one is always
 *            outstanding), attaches the circuit and returns a duplicate of
 *            its doorbell as the new descriptor.
 *
 * UDP sockets are circuit sockets too (datagram circuits, udp.c).  Other
 * sockets (AF_UNIX, AF_NETLINK, raw...) are never recorded: every call on
 * them passes through.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "preload.h"

static bool is_circuit_kind(int domain, int type, int protocol)
{
    return (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM &&
           (protocol == 0 || protocol == IPPROTO_TCP);
}

static int cloexec_of(int fd) { return real.fcntl(fd, F_GETFD) & FD_CLOEXEC ? O_CLOEXEC : 0; }

static void set_nonblock(int fd, bool on)
{
    int fl = real.fcntl(fd, F_GETFL);
    if (fl >= 0)
        real.fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK);
}

static int state_of(struct cp_sock *s) { return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE); }

CP_EXPORT int socket(int domain, int type, int protocol)
{
    cp_init();
    int fd = real.socket(domain, type, protocol);
    bool dgram = cp_udp_kind(domain, type, protocol);
    if (fd < 0 || !cp_active() || !(dgram || is_circuit_kind(domain, type, protocol)))
        return fd;
    struct cp_sock *s = cp_sock_new(domain);
    if (s) /* before it is in the table: its calls are counted from the first (udp.c) */
        s->dgram = dgram, s->fd = fd;
    if (!s || cp_fd_install(fd, s)) {
        free(s);
        real.close(fd);
        errno = ENOMEM;
        return -1;
    }
    s->nonblock = type & SOCK_NONBLOCK;
    cp_log("fd %d: socket %s %s", fd, domain == AF_INET ? "inet" : "inet6",
           dgram ? "dgram" : "stream");
    return fd;
}

void cp_hand_back(int fd, const char *why)
{
    struct cp_sock *s = cp_fd_remove(fd);
    if (s)
        cp_epoll_handed_back(fd, s);
    cp_sock_release(s);
    cp_log("fd %d: handed to the kernel (%s)", fd, why);
}

CP_EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.bind(fd, addr, len);
    struct cp_endpoint ep;
    int rc = cp_endpoint_from(addr, len, s->family, &ep);
    pthread_mutex_lock(&s->lock);
    if (!rc && (state_of(s) != CP_FRESH || s->bound))
        rc = -EINVAL;
    bool bypass = !rc && cp_bypassed(&ep);
    if (!rc && !bypass) {
        s->local = ep;
        s->bound = true;
        s->local.proto = s->dgram ? CP_UDP : CP_TCP;
        if (s->dgram && ep.port) /* a UDP server: its peers come as circuits (udpserver.c) */
            rc = cp_udp_serve(fd, s);
        s->bound = !rc;
        char a[CP_EP_STR];
        cp_log("fd %d: bound to %s%s", fd, cp_endpoint_str(&ep, a),
               rc ? ": failed" : s->dgram && ep.port ? ", serving UDP" : "");
    }
    pthread_mutex_unlock(&s->lock);
    cp_sock_put(s);
    if (bypass) {
        cp_hand_back(fd, "bind to a CIRCUITS_BYPASS address");
        return real.bind(fd, addr, len);
    }
    return (int)cp_ret(rc);
}

int cp_unreachable(int err)
{
    cp_warn("cannot reach the operator at %s: %s (no fall-back to the kernel's network)",
            cp_control_path(), strerror(-err));
    return -ENETUNREACH;
}

/* Our epoll that stands for a listener: readable when its control connection is. */
static int listener_epoll(int ctl)
{
    int lep = cp_hide_fd(real.epoll_create1(EPOLL_CLOEXEC));
    struct epoll_event ev = {.events = EPOLLIN};
    if (lep >= 0 && real.epoll_ctl(lep, EPOLL_CTL_ADD, ctl, &ev) < 0) {
        int err = -errno;
        real.close(lep);
        return err;
    }
    return lep < 0 ? -errno : lep;
}

#define EPHEMERAL_LOW 49152 /* the IANA dynamic range, for a listener bound to port 0 */
#define EPHEMERAL_TRIES 64

/*
 * LISTEN on s->local; on port 0, the kernel would pick a free port: we pick
 * one at random in the dynamic range and try another while the operator
 * says it is in use.  s->local keeps the port that worked (getsockname).
 */
static int listen_somewhere(int ctl, struct cp_sock *s)
{
    if (s->local.port)
        return cp_ctl_listen(ctl, &s->local, s->backlog);
    unsigned seed = (unsigned)cp_now_ns() ^ (unsigned)getpid();
    int err = -EADDRINUSE;
    for (int i = 0; i < EPHEMERAL_TRIES && err == -EADDRINUSE; i++) {
        s->local.port = (uint16_t)(EPHEMERAL_LOW + rand_r(&seed) % (65536 - EPHEMERAL_LOW));
        err = cp_ctl_listen(ctl, &s->local, s->backlog);
    }
    if (err)
        s->local.port = 0;
    return err;
}

static int do_listen(int fd, struct cp_sock *s, int backlog)
{
    if (state_of(s) == CP_LISTENING)
        return 0; /* the kernel lets a listener change its backlog; we keep ours */
    if (state_of(s) != CP_FRESH)
        return -EINVAL;
    if (!s->bound) { /* any address, and a port we pick */
        memset(&s->local, 0, sizeof(s->local));
        s->local.proto = CP_TCP;
    }
    int ctl = cp_ctl_open();
    if (ctl < 0)
        return cp_unreachable(ctl);
    s->backlog = backlog > 0 ? (uint32_t)backlog : 1;
    int err = listen_somewhere(ctl, s), lep = -1;
    if (!err)
        err = cp_ctl_send_accept(ctl, &s->local);
    if (!err && (lep = listener_epoll(ctl)) < 0)
        err = lep;
    if (!err && real.dup3(lep, fd, cloexec_of(fd)) < 0)
        err = -errno;
    if (err) {
        real.close(ctl);
        if (lep >= 0)
            real.close(lep);
        return err;
    }
    set_nonblock(fd, s->nonblock);
    s->ctl = ctl, s->lep = lep;
    __atomic_store_n(&s->state, CP_LISTENING, __ATOMIC_RELEASE);
    cp_epoll_follow(s); /* registrations made before listen() watch the listener's epoll */
    return 0;
}

CP_EXPORT int listen(int fd, int backlog)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.listen(fd, backlog);
    pthread_mutex_lock(&s->lock);
    int rc = s->dgram ? -EOPNOTSUPP : do_listen(fd, s, backlog);
    pthread_mutex_unlock(&s->lock);
    char a[CP_EP_STR];
    cp_log("fd %d: listen on %s: %s", fd, cp_endpoint_str(&s->local, a), rc ? strerror(-rc) : "ok");
    cp_sock_put(s);
    return (int)cp_ret(rc);
}

#define RELISTEN_AFTER_S 1

/* Try listening again once the timer fires: the listener's epoll wakes the program then. */
static void relisten_later(struct cp_sock *s)
{
    if (s->timer < 0) {
        s->timer = cp_hide_fd(timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
        struct epoll_event ev = {.events = EPOLLIN};
        if (s->timer >= 0)
            real.epoll_ctl(s->lep, EPOLL_CTL_ADD, s->timer, &ev);
    }
    struct itimerspec in = {.it_value = {.tv_sec = RELISTEN_AFTER_S}};
    if (s->timer >= 0)
        timerfd_settime(s->timer, 0, &in, NULL);
}

/*
 * The operator left (or restarted): drop the dead control connection, which
 * would keep the listener readable for ever, and LISTEN again on a new one.
 * 0: listening again; -EAGAIN: not yet (the operator is away, or another
 * process holding this listener did it first: EADDRINUSE), tried again
 * each second.
 */
static int relisten(struct cp_sock *s)
{
    uint64_t ticks;
    if (s->ctl >= 0) {
        real.epoll_ctl(s->lep, EPOLL_CTL_DEL, s->ctl, NULL);
        real.close(s->ctl);
        s->ctl = -1;
        cp_warn("the operator closed the listener's control connection: listening again");
    }
    if (s->timer >= 0 && real.read(s->timer, &ticks, sizeof(ticks)) < 0)
        ticks = 0; /* not fired yet: a try now is as good */
    int ctl = cp_ctl_open();
    int err = ctl < 0 ? ctl : cp_ctl_listen(ctl, &s->local, s->backlog);
    struct epoll_event ev = {.events = EPOLLIN};
    if (!err)
        err = cp_ctl_send_accept(ctl, &s->local);
    if (!err && real.epoll_ctl(s->lep, EPOLL_CTL_ADD, ctl, &ev) < 0)
        err = -errno;
    if (err) {
        if (ctl >= 0)
            real.close(ctl);
        relisten_later(s);
        return -EAGAIN;
    }
    s->ctl = ctl;
    char a[CP_EP_STR];
    cp_log("listening again on %s", cp_endpoint_str(&s->local, a));
    return 0;
}

/* Wait for, and take, the reply to our outstanding ACCEPT; then send the next.
 * SO_RCVTIMEO bounds the wait, as the kernel's accept: EAGAIN once it runs out. */
static int take_circuit(struct cp_sock *s, struct cp_circuit_msg *m, int fds[4])
{
    int64_t deadline = cp_deadline(s, false);
    for (;;) {
        int err = s->ctl >= 0 ? cp_ctl_recv_circuit(s->ctl, false, m, fds) : -ECONNABORTED;
        if (err == -ECONNABORTED && s->lst_shut)
            return -EINVAL; /* what the kernel says of accept on a socket shut down */
        if (err == -ECONNABORTED) {
            pthread_mutex_lock(&s->lock); /* threads accepting at once: one listens again */
            err = relisten(s);
            pthread_mutex_unlock(&s->lock);
            if (!err)
                continue;
        }
        if (err != -EAGAIN) {
            if (err != -ENOENT) /* that reply used up our ACCEPT (even a malformed one) */
                cp_ctl_send_accept(s->ctl, &s->local);
            return err;
        }
        if (__atomic_load_n(&s->nonblock, __ATOMIC_RELAXED))
            return -EAGAIN;
        struct pollfd p = {.fd = s->lep, .events = POLLIN};
        int ms = cp_ms_until(deadline);
        if (ms == 0)
            return -EAGAIN;
        if (real.poll(&p, 1, ms) < 0)
            return -errno; /* EINTR: a signal handler ran, as the kernel says */
    }
}

static int do_accept(struct cp_sock *s, struct sockaddr *addr, socklen_t *len, int flags)
{
    if (state_of(s) != CP_LISTENING)
        return -EINVAL;
    struct cp_circuit_msg m;
    int fds[4];
    int err = take_circuit(s, &m, fds);
    if (err)
        return err;
    struct circuit *c;
    if ((err = cp_ctl_attach(&m, fds, 1, CIRCUIT_STREAM, &c))) {
        cp_warn("accept: the operator's circuit %llu cannot be attached: %s",
                (unsigned long long)m.id, strerror(-err));
        return -ECONNABORTED;
    }
    int nfd = real.fcntl(fds[1], flags & SOCK_CLOEXEC ? F_DUPFD_CLOEXEC : F_DUPFD, 0);
    struct cp_sock *ns = nfd < 0 ? NULL : cp_sock_new(s->family);
    if (!ns || cp_fd_install(nfd, ns)) {
        err = nfd < 0 ? -errno : -ENOMEM;
        if (nfd >= 0)
            real.close(nfd);
        free(ns);
        circuit_free(c);
        return err;
    }
    ns->nonblock = flags & SOCK_NONBLOCK;
    if (ns->nonblock)
        set_nonblock(nfd, true);
    ns->c = c, ns->peer_bell = fds[3], ns->circuit_id = m.id, ns->procs = cp_procs_new();
    ns->local = m.local, ns->remote = m.remote;
    __atomic_store_n(&ns->state, CP_CONNECTED, __ATOMIC_RELEASE);
    if (addr && len)
        cp_endpoint_to(&m.remote, s->family, addr, len);
    char a[CP_EP_STR];
    cp_log("fd %d: accepted circuit %llu from %s", nfd, (unsigned long long)m.id,
           cp_endpoint_str(&m.remote, a));
    return nfd;
}

CP_EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.accept4(fd, addr, len, flags);
    int rc = s->dgram ? -EOPNOTSUPP : do_accept(s, addr, len, flags);
    cp_sock_put(s);
    return (int)cp_ret(rc);
}

CP_EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    cp_init();
    if (!cp_fd_maybe(fd))
        return real.accept(fd, addr, len);
    return accept4(fd, addr, len, 0);
}

int cp_placeholder(int fd, struct cp_sock *s)
{
    int k = real.socket(s->family, s->dgram ? SOCK_DGRAM : SOCK_STREAM, 0);
    int err = k < 0 || real.dup3(k, fd, cloexec_of(fd)) < 0 ? -errno : 0;
    if (k >= 0)
        real.close(k);
    if (!err)
        set_nonblock(fd, s->nonblock);
    return err;
}

CP_EXPORT int shutdown(int fd, int how)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.shutdown(fd, how);
    int rc = 0;
    cp_connect_settle(s, false);
    if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)
        rc = -EINVAL;
    else if (s->dgram)
        rc = cp_udp_shutdown(s, how);
    else if (state_of(s) == CP_LISTENING) {
        s->lst_shut = true;
        if (s->ctl >= 0)
            real.shutdown(s->ctl, SHUT_RDWR); /* wakes a blocked accept, which says EINVAL */
    }
    else if (state_of(s) != CP_CONNECTED)
        rc = -ENOTCONN;
    else {
        if (how != SHUT_RD && !s->wr_shut) {
            circuit_shutdown_write(s->c);
            s->wr_shut = true;
        }
        if (how != SHUT_WR)
            s->rd_shut = true;
    }
    cp_log("fd %d: shutdown %s: %s", fd, how == SHUT_RD ? "read" : how == SHUT_WR ? "write" : "both",
           rc ? strerror(-rc) : "ok");
    cp_sock_put(s);
    return (int)cp_ret(rc);
}

CP_EXPORT int close(int fd)
{
    cp_init();
    struct cp_sock *s = cp_fd_remove(fd);
    cp_epoll_closed(fd, s != NULL);
    int rc = real.close(fd);
    if (s) {
        cp_log("fd %d: close", fd);
        cp_sock_release(s); /* the last descriptor and call out closes the circuit */
    }
    return rc;
}

/* ---- duplicates share the socket, as they share a kernel file ---------- */

/* After the kernel put a duplicate of `from` on `to`: mirror it in the table. */
static int mirror_dup(int from, int to)
{
    if (to < 0)
        return to;
    struct cp_sock *s = cp_fd_get(from);
    if (s) {
        cp_fd_install(to, s); /* replaces whatever the table had on `to` */
        cp_sock_put(s);
    } else {
        cp_sock_release(cp_fd_remove(to));
    }
    return to;
}

CP_EXPORT int dup(int fd)
{
    cp_init();
    int nfd = real.dup(fd);
    return cp_fd_maybe(fd) ? mirror_dup(fd, nfd) : nfd;
}

CP_EXPORT int dup2(int fd, int to)
{
    cp_init();
    int rc = real.dup2(fd, to);
    return fd == to || (!cp_fd_maybe(fd) && !cp_fd_maybe(to)) ? rc : mirror_dup(fd, rc);
}

CP_EXPORT int dup3(int fd, int to, int flags)
{
    cp_init();
    int rc = real.dup3(fd, to, flags);
    return !cp_fd_maybe(fd) && !cp_fd_maybe(to) ? rc : mirror_dup(fd, rc);
}

static int fcntl_common(int (*fn)(int, int, ...), int fd, int cmd, long arg)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    int rc = fn(fd, cmd, arg);
    if (!s)
        return rc;
    if (rc >= 0) {
        if (cmd == F_GETFL)
            rc = (rc & ~O_NONBLOCK) | (__atomic_load_n(&s->nonblock, __ATOMIC_RELAXED) ? O_NONBLOCK : 0);
        else if (cmd == F_SETFL)
            __atomic_store_n(&s->nonblock, (arg & O_NONBLOCK) != 0, __ATOMIC_RELAXED);
        else if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
            mirror_dup(fd, rc);
    }
    cp_sock_put(s);
    return rc;
}

CP_EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long); /* ints and pointers alike travel as a long */
    va_end(ap);
    cp_init();
    return fcntl_common(real.fcntl, fd, cmd, arg);
}

CP_EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    cp_init();
    return fcntl_common(real.fcntl64, fd, cmd, arg);
}

/* Bytes waiting to be read, without reading them. */
static int readable_bytes(struct cp_sock *s)
{
    void *ptr;
    if (state_of(s) != CP_CONNECTED)
        return 0;
    if (s->dgram)
        return cp_udp_next_size(s); /* a peek must not cut into a receive's (udp.c) */
    ssize_t n = circuit_peek(s->c, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &ptr);
    return n > 0 ? (n > 0x7fffffff ? 0x7fffffff : (int)n) : 0;
}

CP_EXPORT int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s || (request != FIONREAD && request != FIONBIO)) {
        cp_sock_put(s);
        return real.ioctl(fd, request, arg);
    }
    int rc = 0;
    if (!arg)
        rc = -EFAULT;
    else if (request == FIONBIO) {
        __atomic_store_n(&s->nonblock, *(int *)arg != 0, __ATOMIC_RELAXED);
        real.ioctl(fd, request, arg);
    } else if (state_of(s) == CP_CONNECTED) {
        *(int *)arg = readable_bytes(s);
    } else if (state_of(s) == CP_LISTENING && s->dgram) {
        *(int *)arg = cp_udp_server_next_size(s);
    } else {
        rc = state_of(s) == CP_LISTENING ? -EINVAL : 0;
        if (!rc)
            *(int *)arg = 0;
    }
    cp_sock_put(s);
    return (int)cp_ret(rc);
}

/* ---- names ------------------------------------------------------------- */

/* getsockname (peer false) and getpeername of a circuit socket; -errno. */
static int name_of(struct cp_sock *s, struct sockaddr *addr, socklen_t *len, bool peer)
{
    static const struct cp_endpoint any = {.proto = CP_TCP};
    const struct cp_endpoint *ep = peer ? &s->remote : &s->local;
    if (peer && (state_of(s) != CP_CONNECTED || s->implicit))
        return -ENOTCONN; /* a UDP socket that only sent somewhere is not connected */
    if (!peer && (state_of(s) == CP_FRESH || state_of(s) == CP_CONNECTING) && !s->bound)
        ep = &any;
    if (!len)
        return -EFAULT;
    cp_endpoint_to(ep, s->family, addr, len);
    return 0;
}

CP_EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    ON_SOCKET(fd, name_of(s, addr, len, false), real.getsockname(fd, addr, len));
}

CP_EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    ON_SOCKET(fd, name_of(s, addr, len, true), real.getpeername(fd, addr, len));
}

/* ---- options ----------------------------------------------------------- */

/* Where an option we keep lives in s->opt, or NULL. */
static int *kept_option(struct cp_sock *s, int level, int name)
{
    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_RCVBUF: return &s->opt.rcvbuf;
        case SO_SNDBUF: return &s->opt.sndbuf;
        case SO_REUSEADDR: return &s->opt.reuseaddr;
        case SO_REUSEPORT: return &s->opt.reuseport;
        case SO_KEEPALIVE: return &s->opt.keepalive;
        }
    }
    return level == IPPROTO_TCP && name == TCP_NODELAY ? &s->opt.nodelay : NULL;
}

/* The value of an option of a connected or listening socket, or -ENOPROTOOPT. */
static int emulated_option(struct cp_sock *s, int level, int name, int *value)
{
    int state = state_of(s);
    int *kept = kept_option(s, level, name);
    if (level == SOL_SOCKET && (name == SO_RCVBUF || name == SO_SNDBUF) && !*kept)
        *value = state == CP_CONNECTED ? (int)circuit_area_size(s->c, name == SO_RCVBUF) : 0;
    else if (kept)
        *value = *kept;
    else if (level == SOL_SOCKET && name == SO_TYPE)
        *value = s->dgram ? SOCK_DGRAM : SOCK_STREAM;
    else if (level == SOL_SOCKET && name == SO_DOMAIN)
        *value = s->family;
    else if (level == SOL_SOCKET && name == SO_PROTOCOL)
        *value = s->dgram ? IPPROTO_UDP : IPPROTO_TCP;
    else if (level == SOL_SOCKET && name == SO_ACCEPTCONN)
        *value = state == CP_LISTENING && !s->dgram;
    else
        return -ENOPROTOOPT;
    return 0;
}

/* SO_RCVTIMEO and SO_SNDTIMEO: a timeval, kept as nanoseconds for blocking calls. */
static bool is_timeout(int level, int name)
{
    return level == SOL_SOCKET && (name == SO_RCVTIMEO || name == SO_SNDTIMEO);
}

static int get_timeout(struct cp_sock *s, int name, void *val, socklen_t *len)
{
    int64_t ns = s->timeo_ns[name == SO_SNDTIMEO];
    struct timeval tv = {.tv_sec = ns / 1000000000LL, .tv_usec = ns % 1000000000LL / 1000};
    if (!val || !len || *len < sizeof(tv))
        return -EINVAL;
    memcpy(val, &tv, sizeof(tv));
    *len = sizeof(tv);
    return 0;
}

static int set_timeout(struct cp_sock *s, int name, const void *val, socklen_t len)
{
    struct timeval tv;
    if (!val || len < sizeof(tv))
        return -EINVAL;
    memcpy(&tv, val, sizeof(tv));
    if (tv.tv_sec < 0 || tv.tv_usec < 0 || tv.tv_usec >= 1000000)
        return -EDOM; /* what the kernel says of a bad timeval */
    s->timeo_ns[name == SO_SNDTIMEO] = (int64_t)tv.tv_sec * 1000000000LL + tv.tv_usec * 1000LL;
    return 0;
}

CP_EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.getsockopt(fd, level, name, val, len);
    int rc, value = 0;
    if (is_timeout(level, name) && state_of(s) != CP_FRESH) {
        rc = get_timeout(s, name, val, len);
        cp_sock_put(s);
        return (int)cp_ret(rc);
    }
    if (level == SOL_SOCKET && name == SO_ERROR) {
        cp_connect_settle(s, false); /* an answer that came is the outcome */
        value = __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL);
        rc = 0;
    } else if (state_of(s) == CP_FRESH) {
        cp_sock_put(s); /* the placeholder is a socket of the right family: it knows */
        return real.getsockopt(fd, level, name, val, len);
    } else {
        rc = emulated_option(s, level, name, &value);
    }
    if (!rc && (!val || !len || *len < sizeof(int)))
        rc = -EINVAL;
    if (!rc) {
        memcpy(val, &value, sizeof(int));
        *len = sizeof(int);
    }
    cp_sock_put(s);
    return (int)cp_ret(rc);
}

CP_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.setsockopt(fd, level, name, val, len);
    int rc = 0;
    if (state_of(s) == CP_FRESH)
        rc = real.setsockopt(fd, level, name, val, len) < 0 ? -errno : 0;
    if (is_timeout(level, name)) {
        rc = rc ? rc : set_timeout(s, name, val, len);
        cp_sock_put(s);
        return (int)cp_ret(rc);
    }
    int *kept = kept_option(s, level, name);
    if (!rc && kept && val && len >= sizeof(int))
        memcpy(kept, val, sizeof(int));
    else if (!rc && !kept && state_of(s) != CP_FRESH)
        cp_log("fd %d: option %d/%d has no meaning on a circuit: ignored", fd, level, name);
    cp_sock_put(s);
    return (int)cp_ret(rc);
}
