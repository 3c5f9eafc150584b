/*
 * udp.c - UDP sockets as datagram circuits.
 *
 * socket(AF_INET or AF_INET6, SOCK_DGRAM) is a circuit socket like a TCP one
 * (socket.c puts a kernel placeholder on its number).  A datagram circuit
 * has exactly one peer, which shapes everything here:
 *
 *   connect   asks the operator for a datagram circuit (CONNECT with proto
 *             UDP): the policy decides, and the other end is the proxy
 *             stack (one connected host UDP socket) or a guest's datagram
 *             listener.  A connect to another address ends the circuit and
 *             asks again (glibc's getaddrinfo connects one socket to each
 *             candidate address in turn to learn the source address);
 *             AF_UNSPEC only ends it.  A refused connect leaves the socket
 *             unconnected.
 *   sendto    on an unconnected socket connects implicitly to that address
 *             (getpeername still says ENOTCONN, as for the kernel); to an
 *             address other than the circuit's peer it fails with EISCONN,
 *             so a datagram never goes anywhere the program did not name.
 *   send      one call is one record in the ring, never split; a datagram
 *             larger than the ring can hold, or than UDP carries, is
 *             EMSGSIZE.  Vectors are gathered straight into the ring.
 *   recv      one record per call, scattered straight from the ring; a
 *             short buffer truncates the datagram (the rest is dropped and
 *             MSG_TRUNC says so, as UDP does); recvfrom names the peer.
 *
 * The peer ending the circuit (the proxy stack closes a flow idle for its
 * udp_idle_timeout) does not end a UDP socket: the next send connects
 * again to the same address, and a receive meanwhile says ECONNREFUSED (a
 * connected UDP socket's word for "nobody answers there any more").
 *
 * A socket bound to a port is a server of many peers instead: udpserver.c,
 * to which the data calls here hand it.
 *
 * A replaced circuit may still be in use by another thread's call on the
 * same socket: it is ended at once but unmapped only when no call can hold
 * it: at once when no other call is in flight (s->calls), else when the
 * last call in flight leaves, or with the socket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "preload.h"

/* The largest UDP payload of IPv4 and of IPv6 (65535 less the headers). */
#define UDP_MAX_V4 65507
#define UDP_MAX_V6 65527

struct retired {
    struct circuit *c;
    struct retired *next;
};

static int state_of(struct cp_sock *s) { return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE); }

bool cp_udp_kind(int domain, int type, int protocol)
{
    return (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_DGRAM &&
           (protocol == 0 || protocol == IPPROTO_UDP);
}

/* ---- the circuit under the socket ---------------------------------------- */

/* Unmap every retired circuit (s->lock held, no other call in flight). */
static void free_retired(struct cp_sock *s)
{
    struct retired *r = __atomic_exchange_n((struct retired **)&s->retired, NULL, __ATOMIC_ACQ_REL);
    for (struct retired *next; r; r = next) {
        next = r->next;
        circuit_free(r->c);
        free(r);
    }
}

/*
 * Only calls load s->c or a peer's circuit, and each is counted in s->calls
 * before it does (cp_call_enter).  Pairs with that count: either the call
 * sees the new circuit, or we see it in flight.  The caller is itself a
 * call (or the socket's end, with none in flight): with no other, nobody
 * can hold `old` or an earlier retired one.
 */
void cp_udp_retire(struct cp_sock *s, struct circuit *old)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->calls, __ATOMIC_SEQ_CST) <= 1) {
        circuit_free(old);
        free_retired(s);
        return;
    }
    struct retired *r = malloc(sizeof(*r));
    if (!r)
        return; /* out of memory with a call in flight: leak it rather than pull it away */
    r->c = old, r->next = s->retired;
    __atomic_store_n((struct retired **)&s->retired, r, __ATOMIC_RELEASE);
}

void cp_udp_reap(struct cp_sock *s)
{
    /* Not waiting for the lock: whoever holds it is a call, which reaps as it leaves. */
    if (pthread_mutex_trylock(&s->lock))
        return;
    if (__atomic_load_n(&s->calls, __ATOMIC_SEQ_CST) == 0)
        free_retired(s); /* a call that came in since loaded the current circuit */
    pthread_mutex_unlock(&s->lock);
}

void cp_udp_free(struct cp_sock *s)
{
    cp_udp_unserve(s);
    free_retired(s);
}

/* Is fd still a descriptor of s?  The program may have closed that number
 * (and kept a duplicate): then it is not ours to replace. */
static bool holds(int fd, struct cp_sock *s)
{
    return cp_fd_is(fd, s);
}

/*
 * End the socket's circuit and put a placeholder back on its descriptor
 * (s->lock held).  The circuit stays mapped on s->c, ended, until a new
 * one replaces it: calls racing with this one find it closed, not gone.
 */
static void dissolve(struct cp_sock *s)
{
    int state = state_of(s);
    if (state == CP_LISTENING) { /* a server becomes a client */
        cp_udp_unserve(s);
        if (holds(s->fd, s))
            cp_placeholder(s->fd, s);
        __atomic_store_n(&s->state, CP_FRESH, __ATOMIC_RELEASE);
        cp_epoll_follow(s);
        return;
    }
    if (state == CP_FAILED) {
        __atomic_store_n(&s->state, CP_FRESH, __ATOMIC_RELEASE);
        cp_epoll_follow(s);
    }
    if (state != CP_CONNECTED)
        return;
    char a[CP_EP_STR];
    cp_log("fd %d: udp circuit %llu to %s ended: %llu bytes sent, %llu received", s->fd,
           (unsigned long long)s->circuit_id, cp_endpoint_str(&s->peer, a),
           (unsigned long long)circuit_bytes_sent(s->c),
           (unsigned long long)circuit_bytes_received(s->c));
    if (holds(s->fd, s))
        cp_placeholder(s->fd, s);
    __atomic_store_n(&s->state, CP_FRESH, __ATOMIC_RELEASE);
    cp_epoll_follow(s); /* off the doorbell while it is open: the circuit closes next */
    if (cp_procs_leave(s))
        circuit_close(s->c); /* the peer (the proxy stack) drops the flow */
    else
        circuit_detach(s->c); /* another process holds it still (fork.c) */
    s->peer_bell = -1, s->implicit = false;
}

/* Connect s (s->lock held) to ep: a new circuit on s->fd, the old one retired. */
static int join(struct cp_sock *s, const struct cp_endpoint *ep, bool implicit)
{
    /* nc -u -l and socat UDP-LISTEN peek at the first datagram, then connect to its sender */
    if (state_of(s) == CP_LISTENING && holds(s->fd, s) && !cp_udp_adopt(s, ep))
        return 0;
    dissolve(s);
    if (!holds(s->fd, s))
        return -EBADF; /* connected through a number since closed: see docs/preload.md */
    struct circuit *old = s->c;
    int err = cp_connect_circuit(s->fd, s, ep);
    char a[CP_EP_STR];
    cp_log("fd %d: udp %s to %s: %s, circuit %llu", s->fd, implicit ? "send" : "connect",
           cp_endpoint_str(ep, a), err ? strerror(-err) : "connected",
           (unsigned long long)s->circuit_id);
    if (err)
        return err;
    s->peer = *ep, s->implicit = implicit;
    if (old)
        cp_udp_retire(s, old);
    return 0;
}

int cp_udp_endpoint(struct cp_sock *s, const struct sockaddr *addr, socklen_t len,
                    struct cp_endpoint *ep)
{
    int err = cp_endpoint_from(addr, len, s->family, ep);
    ep->proto = CP_UDP;
    if (!err && !ep->port)
        err = -EINVAL; /* port 0 is nobody's: the kernel refuses to send there */
    return err;
}

int cp_udp_connect(int fd, struct cp_sock *s, const struct sockaddr *addr, socklen_t len)
{
    if (!addr)
        return -EFAULT;
    if (len >= sizeof(sa_family_t) && addr->sa_family == AF_UNSPEC) {
        pthread_mutex_lock(&s->lock);
        s->fd = fd;
        if (state_of(s) != CP_LISTENING) /* a server is connected to nobody: nothing to undo, */
            dissolve(s);                 /* and it keeps its port, as the kernel's does */
        pthread_mutex_unlock(&s->lock);
        cp_log("fd %d: udp connect AF_UNSPEC: unconnected", fd);
        return 0;
    }
    struct cp_endpoint ep;
    int err = cp_udp_endpoint(s, addr, len, &ep);
    if (err)
        return err;
    pthread_mutex_lock(&s->lock);
    s->fd = fd;
    if (cp_bypassed(&ep))
        dissolve(s); /* a placeholder again: socket.c hands it to the kernel */
    else
        err = join(s, &ep, false);
    bool bypass = cp_bypassed(&ep);
    pthread_mutex_unlock(&s->lock);
    return bypass ? CP_HAND_BACK : err;
}

static bool same_peer(const struct cp_endpoint *a, const struct cp_endpoint *b)
{
    return a->port == b->port && memcmp(a->addr, b->addr, sizeof(a->addr)) == 0;
}

int cp_udp_shutdown(struct cp_sock *s, int how)
{
    pthread_mutex_lock(&s->lock);
    int state = state_of(s);
    if (how != SHUT_WR)
        __atomic_store_n(&s->rd_shut, true, __ATOMIC_RELEASE);
    if (how != SHUT_RD)
        __atomic_store_n(&s->wr_shut, true, __ATOMIC_RELEASE);
    if (how != SHUT_WR && state == CP_LISTENING)
        cp_udp_server_shut(s);
    /* A receiver asleep in the ring wakes only at the circuit's end: end it
     * (it stays mapped; a send after SHUT_RD alone connects again). */
    if (how != SHUT_WR && state == CP_CONNECTED)
        circuit_close(s->c);
    else if (how == SHUT_WR && state == CP_CONNECTED)
        circuit_shutdown_write(s->c);
    pthread_mutex_unlock(&s->lock);
    return state == CP_CONNECTED ? 0 : -ENOTCONN;
}

/* sendto's address: connect implicitly, or check it names the circuit's peer. */
static int aim(struct cp_sock *s, const struct sockaddr *addr, socklen_t len)
{
    struct cp_endpoint ep;
    int err = cp_udp_endpoint(s, addr, len, &ep);
    if (err)
        return err;
    pthread_mutex_lock(&s->lock);
    if (state_of(s) != CP_CONNECTED)
        err = cp_bypassed(&ep) ? -ENETUNREACH : join(s, &ep, true);
    else if (!same_peer(&ep, &s->peer))
        err = -EISCONN; /* one circuit, one peer: never a datagram to the wrong one */
    pthread_mutex_unlock(&s->lock);
    return err;
}

/* The peer ended the circuit: connect again to the same address. */
static int rejoin(struct cp_sock *s, struct circuit *ended)
{
    pthread_mutex_lock(&s->lock);
    int err = 0;
    if (s->c == ended) /* another thread may have done it already */
        err = join(s, &s->peer, s->implicit);
    pthread_mutex_unlock(&s->lock);
    return err;
}

/* ---- data ------------------------------------------------------------------ */

static int udp_flags(struct cp_sock *s, int flags)
{
    return (flags & MSG_DONTWAIT) || __atomic_load_n(&s->nonblock, __ATOMIC_RELAXED)
               ? CIRCUIT_NONBLOCK : 0;
}

/* Total length of a vector; -EINVAL if it is malformed or overflows. */
static ssize_t iov_total(const struct iovec *iov, size_t cnt)
{
    size_t total = 0;
    if (cnt > IOV_MAX || (cnt && !iov))
        return -EINVAL;
    for (size_t i = 0; i < cnt; i++) {
        if (iov[i].iov_len > SSIZE_MAX - total)
            return -EINVAL;
        total += iov[i].iov_len;
    }
    return (ssize_t)total;
}

/* Copy n bytes of src into the vector (the caller checked it holds them). */
static void scatter(const struct iovec *iov, size_t cnt, const uint8_t *src, size_t n)
{
    for (size_t i = 0; i < cnt && n; i++) {
        size_t k = iov[i].iov_len < n ? iov[i].iov_len : n;
        memcpy(iov[i].iov_base, src, k);
        src += k, n -= k;
    }
}

static void gather(const struct iovec *iov, size_t cnt, uint8_t *dst)
{
    for (size_t i = 0; i < cnt; i++) {
        memcpy(dst, iov[i].iov_base, iov[i].iov_len);
        dst += iov[i].iov_len;
    }
}

/* Take the next datagram into the vector; its full length, or -errno. */
static ssize_t take(struct cp_sock *s, struct circuit *c, const struct iovec *iov, size_t cnt,
                    size_t room, int flags)
{
    int cflags = udp_flags(s, flags);
    int64_t deadline = cp_deadline(s, false);
    if (cnt == 1 && !(flags & MSG_PEEK)) /* the common case: one copy, one call */
        return circuit_recv(c, iov[0].iov_base, iov[0].iov_len, cflags, deadline);
    void *ptr;
    ssize_t full = circuit_peek(c, cflags, deadline, &ptr);
    if (full < 0)
        return full;
    scatter(iov, cnt, ptr, (size_t)full < room ? (size_t)full : room);
    int err = flags & MSG_PEEK ? 0 : circuit_consume(c, (size_t)full);
    return err ? err : full;
}

ssize_t cp_udp_take(struct cp_sock *s, struct circuit *c, struct msghdr *msg, int flags)
{
    ssize_t room = iov_total(msg->msg_iov, msg->msg_iovlen);
    if (room < 0)
        return room;
    ssize_t full = take(s, c, msg->msg_iov, msg->msg_iovlen, (size_t)room, flags);
    if (full == -EAGAIN || full == -ETIMEDOUT) {
        __atomic_add_fetch(&s->rx_again, 1, __ATOMIC_RELEASE);
        return -EAGAIN;
    }
    if (full == -ESHUTDOWN || full == -EBADF)
        return -ECONNREFUSED; /* the peer ended the flow */
    if (full < 0)
        return full;
    msg->msg_controllen = 0; /* no ancillary data travels on a circuit */
    msg->msg_flags = full > room ? MSG_TRUNC : 0;
    return flags & MSG_TRUNC || full <= room ? full : room;
}

/*
 * One receive at a time on a connected socket: a vector or MSG_PEEK receive
 * peeks, copies, then consumes, and any other receive (or peek) in between
 * would hand the same datagram to two threads, or tear the copy (the core
 * keeps one pending peek per circuit).  A non-blocking receive that finds
 * another under way says EAGAIN (the other one waits: nothing is there);
 * a blocking one waits its turn, within SO_RCVTIMEO.
 */
static int lock_rx(struct cp_sock *s, int flags)
{
    int err;
    if (udp_flags(s, flags) & CIRCUIT_NONBLOCK)
        err = pthread_mutex_trylock(&s->rx_lock);
    else if (s->timeo_ns[0] <= 0)
        err = pthread_mutex_lock(&s->rx_lock);
    else {
        int64_t d = cp_deadline(s, false);
        struct timespec ts = {.tv_sec = d / 1000000000LL, .tv_nsec = d % 1000000000LL};
        err = pthread_mutex_clocklock(&s->rx_lock, CLOCK_MONOTONIC, &ts);
    }
    if (!err)
        return 0;
    __atomic_add_fetch(&s->rx_again, 1, __ATOMIC_RELEASE);
    return -EAGAIN;
}

int cp_udp_next_size(struct cp_sock *s)
{
    if (pthread_mutex_trylock(&s->rx_lock))
        return 0; /* a receive is under way: it takes what waits */
    void *ptr;
    ssize_t n = circuit_peek(s->c, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &ptr);
    pthread_mutex_unlock(&s->rx_lock);
    return n > 0 ? (n > 0x7fffffff ? 0x7fffffff : (int)n) : 0;
}

static bool rd_shut(struct cp_sock *s) { return __atomic_load_n(&s->rd_shut, __ATOMIC_ACQUIRE); }

ssize_t cp_udp_recvmsg(struct cp_sock *s, struct msghdr *msg, int flags)
{
    int state = state_of(s);
    if (flags & MSG_ERRQUEUE)
        return -EAGAIN; /* no ICMP error crosses a circuit: the queue is always empty */
    if (rd_shut(s))
        return 0; /* shutdown(SHUT_RD): Linux's UDP says 0, connected or not */
    if (state == CP_LISTENING)
        return cp_udp_server_recvmsg(s, msg, flags);
    if (state != CP_CONNECTED) /* neither connected nor bound to a port: no peer can send */
        return state == CP_FAILED ? -__atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL)
                                  : -ENOTCONN;
    ssize_t n = lock_rx(s, flags);
    if (!n) {
        n = cp_udp_take(s, s->c, msg, flags); /* ECONNREFUSED: a send connects again */
        pthread_mutex_unlock(&s->rx_lock);
    }
    if (n < 0 && rd_shut(s))
        return 0; /* woken by shutdown (cp_udp_shutdown closed the circuit) */
    if (n >= 0 && msg->msg_name)
        cp_endpoint_to(&s->remote, s->family, msg->msg_name, &msg->msg_namelen);
    else if (n >= 0)
        msg->msg_namelen = 0;
    return n;
}

/* Put one datagram of `total` bytes from the vector into the ring. */
static ssize_t put(struct cp_sock *s, struct circuit *c, const struct iovec *iov, size_t cnt,
                   size_t total, int flags)
{
    int cflags = udp_flags(s, flags);
    int64_t deadline = cp_deadline(s, true);
    if (cnt <= 1) /* an empty datagram may have no buffer at all */
        return circuit_send(c, cnt ? iov[0].iov_base : NULL, total, cflags, deadline);
    void *ptr;
    ssize_t n = circuit_reserve(c, total, cflags, deadline, &ptr);
    if (n < 0)
        return n;
    gather(iov, cnt, ptr);
    int err = circuit_commit(c, total);
    return err ? err : (ssize_t)total;
}

ssize_t cp_udp_put_msg(struct cp_sock *s, struct circuit *c, const struct msghdr *msg,
                       int flags, const struct cp_endpoint *to)
{
    ssize_t total = iov_total(msg->msg_iov, msg->msg_iovlen);
    if (total < 0)
        return total;
    size_t ring = circuit_max_dgram(c);
    size_t udp = cp_endpoint_is_v4(to) ? UDP_MAX_V4 : UDP_MAX_V6;
    if ((size_t)total > ring || (size_t)total > udp)
        return -EMSGSIZE;
    ssize_t n = put(s, c, msg->msg_iov, msg->msg_iovlen, (size_t)total, flags);
    if (n == -EAGAIN || n == -ETIMEDOUT) {
        __atomic_add_fetch(&s->tx_again, 1, __ATOMIC_RELEASE);
        return -EAGAIN;
    }
    return n;
}

/* A server's datagram goes to the peer it names. */
static ssize_t serve_one(struct cp_sock *s, const struct msghdr *msg, int flags)
{
    struct cp_endpoint to;
    int err = msg->msg_name ? cp_udp_endpoint(s, msg->msg_name, msg->msg_namelen, &to)
                            : -EDESTADDRREQ;
    return err ? err : cp_udp_server_sendmsg(s, msg, flags, &to);
}

ssize_t cp_udp_sendmsg(struct cp_sock *s, const struct msghdr *msg, int flags)
{
    if (msg->msg_controllen)
        return -EOPNOTSUPP; /* IP_PKTINFO and the like cannot cross a circuit */
    if (__atomic_load_n(&s->wr_shut, __ATOMIC_ACQUIRE))
        return -EPIPE;
    if (state_of(s) == CP_LISTENING)
        return serve_one(s, msg, flags);
    int err = 0;
    if (msg->msg_name)
        err = aim(s, msg->msg_name, msg->msg_namelen);
    else if (state_of(s) != CP_CONNECTED)
        err = state_of(s) == CP_FAILED ? -ECONNREFUSED : -EDESTADDRREQ;
    if (err)
        return err;
    struct circuit *c = s->c;
    ssize_t n = cp_udp_put_msg(s, c, msg, flags, &s->peer);
    if ((n == -EPIPE || n == -EBADF) && !(err = rejoin(s, c)))
        n = cp_udp_put_msg(s, s->c, msg, flags, &s->peer);
    return err ? err : n;
}

ssize_t cp_udp_recv(struct cp_sock *s, void *buf, size_t len, int flags, struct sockaddr *addr,
                    socklen_t *alen)
{
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_name = addr,
                       .msg_namelen = alen ? *alen : 0};
    if (!alen)
        m.msg_name = NULL;
    ssize_t n = cp_udp_recvmsg(s, &m, flags);
    if (n >= 0 && alen)
        *alen = m.msg_namelen;
    return n;
}

ssize_t cp_udp_send(struct cp_sock *s, const void *buf, size_t len, int flags,
                    const struct sockaddr *addr, socklen_t alen)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_name = (void *)addr,
                       .msg_namelen = alen};
    return cp_udp_sendmsg(s, &m, flags);
}
