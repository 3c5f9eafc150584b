/*
 * udpserver.c - a UDP socket bound to a port: a server of many peers.
 *
 * A datagram circuit has one peer, so a bound UDP socket is a datagram
 * listener (LISTEN with proto UDP, one ACCEPT always outstanding, as
 * socket.c does for TCP) and a table of peer circuits: each peer that
 * connects or sends to the bound address gets its own circuit from the
 * operator, which this socket accepts.
 *
 *   the descriptor   a duplicate of an epoll of our own holding the control
 *                    connection (a new peer waits) and every peer circuit's
 *                    doorbell (kept armed: it rings when a datagram comes)
 *                    and the peer's doorbell end (hang-up): the kernel's
 *                    poll, select and epoll of it tell the truth.
 *   recvfrom         takes new peers, then the next datagram of any peer
 *                    (round robin, so one busy peer cannot starve the
 *                    others), naming that peer; a peer that ended is dropped.
 *   sendto           to a peer of the table goes on its circuit; to any
 *                    other address, a circuit is asked for (CONNECT) and
 *                    becomes a peer: its source port is the operator's
 *                    choice, not the bound port.
 *
 * The table changes under s->lock; a removed circuit is retired as udp.c
 * retires a replaced one, so a call on another thread never loses it.
 *
 * After fork, parent and child share the server as they would a kernel
 * socket: the server has a process count (s->procs, fork.c), and a process
 * that closes its copy while another holds one leaves its peers' circuits
 * (detached) rather than ending them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "preload.h"

#define MAX_PEERS 4096 /* beyond, new peers' circuits are refused (closed) */

struct peer {
    struct cp_endpoint addr; /* the peer, as recvfrom names it */
    struct circuit *c;
    int bell, peer_bell;
    uint64_t id; /* the operator's circuit id */
};

struct cp_udp_server {
    struct peer *peers;
    int n, cap;
    unsigned next; /* where the round robin starts */
    int shut;      /* shutdown(SHUT_RD): an eventfd in the server's epoll, -1 before */
};

/* ---- the table --------------------------------------------------------- */

static void watch(struct cp_sock *s, struct peer *p)
{
    struct epoll_event in = {.events = EPOLLIN}, hup = {.events = 0};
    real.epoll_ctl(s->lep, EPOLL_CTL_ADD, p->bell, &in);
    real.epoll_ctl(s->lep, EPOLL_CTL_ADD, p->peer_bell, &hup);
    circuit_arm_read(p->c);
}

/* Add a circuit to the table (s->lock held); it is closed if there is no room. */
static int add_peer(struct cp_sock *s, struct circuit *c, int fds[4], uint64_t id,
                    const struct cp_endpoint *addr)
{
    struct cp_udp_server *t = s->server;
    if (t->n == t->cap) {
        int cap = t->cap ? 2 * t->cap : 16;
        struct peer *more = cap <= MAX_PEERS ? realloc(t->peers, cap * sizeof(*more)) : NULL;
        if (!more) {
            circuit_free(c);
            return -ENOBUFS;
        }
        t->peers = more, t->cap = cap;
    }
    struct peer *p = &t->peers[t->n++];
    *p = (struct peer){.addr = *addr, .c = c, .bell = fds[1], .peer_bell = fds[3], .id = id};
    watch(s, p);
    return 0;
}

/* Take peer i out of the table (s->lock held), its circuit as it is. */
static struct peer unwatch(struct cp_sock *s, int i)
{
    struct cp_udp_server *t = s->server;
    struct peer p = t->peers[i];
    real.epoll_ctl(s->lep, EPOLL_CTL_DEL, p.bell, NULL);
    real.epoll_ctl(s->lep, EPOLL_CTL_DEL, p.peer_bell, NULL);
    t->peers[i] = t->peers[--t->n];
    return p;
}

/* End peer i's circuit and take it out of the table (s->lock held). */
static void drop_peer(struct cp_sock *s, int i)
{
    struct peer p = unwatch(s, i);
    circuit_close(p.c);
    cp_udp_retire(s, p.c);
}

/* Let go of peer i's circuit without ending it: another process that
 * shares the server (fork) still serves that peer (s->lock held). */
static void leave_peer(struct cp_sock *s, int i)
{
    struct peer p = unwatch(s, i);
    circuit_detach(p.c);
    cp_udp_retire(s, p.c);
}

static struct peer *find_peer(struct cp_udp_server *t, const struct cp_endpoint *addr)
{
    for (int i = 0; i < t->n; i++)
        if (t->peers[i].addr.port == addr->port &&
            memcmp(t->peers[i].addr.addr, addr->addr, sizeof(addr->addr)) == 0)
            return &t->peers[i];
    return NULL;
}

/* Take every circuit the operator offers now, sending the next ACCEPT each time. */
static void take_new_peers(struct cp_sock *s)
{
    struct cp_circuit_msg m;
    int fds[4];
    for (;;) {
        int err = s->ctl >= 0 ? cp_ctl_recv_circuit(s->ctl, false, &m, fds) : -EAGAIN;
        if (err == -EAGAIN)
            return;
        if (err == -ECONNABORTED) { /* the operator left: peers go on, no new ones */
            real.epoll_ctl(s->lep, EPOLL_CTL_DEL, s->ctl, NULL);
            real.close(s->ctl);
            s->ctl = -1;
            cp_warn("the operator closed a UDP server's control connection: no new peers");
            return;
        }
        if (err != -ENOENT)
            cp_ctl_send_accept(s->ctl, &s->local);
        struct circuit *c;
        if (err || cp_ctl_attach(&m, fds, 1, CIRCUIT_DGRAM, &c))
            continue;
        add_peer(s, c, fds, m.id, &m.remote);
    }
}

/* ---- serving ------------------------------------------------------------- */

int cp_udp_serve(int fd, struct cp_sock *s)
{
    int ctl = cp_ctl_open();
    if (ctl < 0)
        return cp_unreachable(ctl);
    s->server = calloc(1, sizeof(struct cp_udp_server));
    if (s->server)
        ((struct cp_udp_server *)s->server)->shut = -1;
    int lep = cp_hide_fd(real.epoll_create1(EPOLL_CLOEXEC));
    struct epoll_event ev = {.events = EPOLLIN};
    int err = !s->server || lep < 0 ? -ENOMEM : cp_ctl_listen(ctl, &s->local, SOMAXCONN);
    if (!err)
        err = cp_ctl_send_accept(ctl, &s->local);
    if (!err && real.epoll_ctl(lep, EPOLL_CTL_ADD, ctl, &ev) < 0)
        err = -errno;
    if (!err && real.dup3(lep, fd, real.fcntl(fd, F_GETFD) & FD_CLOEXEC ? O_CLOEXEC : 0) < 0)
        err = -errno;
    if (err) {
        real.close(ctl);
        if (lep >= 0)
            real.close(lep);
        free(s->server);
        s->server = NULL;
        return err;
    }
    s->ctl = ctl, s->lep = lep;
    s->procs = cp_procs_new(); /* the processes sharing the server, and its peers (fork.c) */
    __atomic_store_n(&s->state, CP_LISTENING, __ATOMIC_RELEASE);
    cp_epoll_follow(s); /* registrations made before bind() watch the server's epoll */
    return 0;
}

int cp_udp_adopt(struct cp_sock *s, const struct cp_endpoint *addr)
{
    struct cp_udp_server *t = s->server;
    struct peer *found = t ? find_peer(t, addr) : NULL;
    if (!found)
        return -ENOENT;
    struct peer p = unwatch(s, (int)(found - t->peers));
    int cloexec = real.fcntl(s->fd, F_GETFD) & FD_CLOEXEC ? O_CLOEXEC : 0;
    if (real.dup3(p.bell, s->fd, cloexec) < 0) {
        int err = -errno;
        circuit_close(p.c);
        cp_udp_retire(s, p.c); /* another thread may be sending on it */
        return err;
    }
    int fl = real.fcntl(s->fd, F_GETFL); /* the doorbell's file: O_NONBLOCK as the program set it */
    if (fl >= 0)
        real.fcntl(s->fd, F_SETFL, s->nonblock ? fl | O_NONBLOCK : fl & ~O_NONBLOCK);
    cp_udp_unserve(s);
    s->c = p.c, s->peer_bell = p.peer_bell, s->circuit_id = p.id, s->procs = cp_procs_new();
    s->remote = s->peer = p.addr, s->implicit = false;
    __atomic_store_n(&s->state, CP_CONNECTED, __ATOMIC_RELEASE);
    cp_epoll_follow(s); /* from the server's epoll (gone) to the peer's doorbell */
    char a[CP_EP_STR];
    cp_log("fd %d: udp server connected to its peer %s, circuit %llu", s->fd,
           cp_endpoint_str(addr, a), (unsigned long long)p.id);
    return 0;
}

void cp_udp_unserve(struct cp_sock *s)
{
    struct cp_udp_server *t = s->server;
    if (!t)
        return;
    cp_epoll_unhook(s); /* registrations watch the epoll closed here */
    bool last = cp_procs_leave(s); /* else a forked copy serves the peers on */
    while (t->n)
        (last ? drop_peer : leave_peer)(s, t->n - 1);
    if (s->ctl >= 0)
        real.close(s->ctl); /* the operator drops the listener with it */
    if (s->lep >= 0)
        real.close(s->lep);
    if (t->shut >= 0)
        real.close(t->shut);
    s->ctl = s->lep = -1;
    free(t->peers);
    free(t);
    s->server = NULL;
}

void cp_udp_server_shut(struct cp_sock *s)
{
    struct cp_udp_server *t = s->server;
    if (!t || t->shut >= 0)
        return;
    /* Readable for good: poll, select, epoll and receivers asleep on the
     * server's epoll all wake, as they do for a kernel socket shut down. */
    t->shut = cp_hide_fd(eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK));
    struct epoll_event in = {.events = EPOLLIN};
    if (t->shut >= 0)
        real.epoll_ctl(s->lep, EPOLL_CTL_ADD, t->shut, &in);
}

/* A peer whose circuit says this is gone for good. */
static bool ended(ssize_t err)
{
    return err == -ECONNREFUSED || err == -ECONNRESET || err == -EPIPE || err == -EPROTO;
}

/* Peer i was found empty: arm its doorbell, so that it rings at the next
 * datagram; false if that showed the peer gone (its end of our doorbell
 * closed): then it is dropped, or it would keep the descriptor readable. */
static bool rearm(struct cp_sock *s, int i)
{
    struct circuit *c = ((struct cp_udp_server *)s->server)->peers[i].c;
    circuit_arm_read(c);
    if (!(circuit_poll_known(c) & CIRCUIT_HANGUP))
        return true;
    drop_peer(s, i);
    return false;
}

/*
 * One look at every peer, without waiting (s->lock held): the next datagram
 * into msg, and its peer in *from; -EAGAIN if none waits.  The descriptor
 * must be readable exactly when a datagram (or a new peer) waits, as a
 * kernel socket's is: a peer found empty, or whose datagram was just taken,
 * is armed (its doorbell rings again at once if another waits, else at the
 * next); a peer that ended is dropped.
 */
static ssize_t look(struct cp_sock *s, struct msghdr *msg, int flags, struct cp_endpoint *from)
{
    struct cp_udp_server *t = s->server;
    take_new_peers(s);
    for (int tried = 0; tried < t->n;) {
        int i = (int)(t->next % (unsigned)t->n);
        ssize_t n = cp_udp_take(s, t->peers[i].c, msg, flags | MSG_DONTWAIT);
        if (ended(n)) {
            drop_peer(s, i); /* slot i now holds another peer, or none */
            continue;
        }
        if (n != -EAGAIN) {
            *from = t->peers[i].addr;
            if (!(flags & MSG_PEEK)) { /* a peek leaves that datagram the next to take */
                circuit_arm_read(t->peers[i].c);
                t->next = (unsigned)i + 1;
            }
            return n;
        }
        if (!rearm(s, i))
            continue; /* dropped: slot i now holds another peer, or none */
        t->next = (unsigned)i + 1;
        tried++;
    }
    return -EAGAIN;
}

/* Sleep until the server's descriptor is readable, at most ms (-1: for ever);
 * 0, or -errno (EINTR: a signal handler ran). */
static int nap(struct cp_sock *s, int lep, int ms)
{
    struct pollfd p = {.fd = lep, .events = POLLIN};
    cp_call_leave(s); /* asleep, this call holds no circuit: let retired ones go */
    int rc = real.poll(&p, 1, ms);
    int err = errno;
    cp_call_enter(s);
    return rc < 0 ? -err : 0;
}

/* One look, s->lock taken here; *lep: the descriptor to sleep on. */
static ssize_t look_locked(struct cp_sock *s, struct msghdr *msg, int flags,
                           struct cp_endpoint *from, int *lep)
{
    pthread_mutex_lock(&s->lock);
    ssize_t n = s->server ? look(s, msg, flags, from) : -ENOTCONN;
    *lep = s->lep;
    pthread_mutex_unlock(&s->lock);
    return n;
}

ssize_t cp_udp_server_recvmsg(struct cp_sock *s, struct msghdr *msg, int flags)
{
    bool nonblock = (flags & MSG_DONTWAIT) || __atomic_load_n(&s->nonblock, __ATOMIC_RELAXED);
    int64_t deadline = cp_deadline(s, false);
    for (;;) {
        struct cp_endpoint from;
        int lep;
        if (__atomic_load_n(&s->rd_shut, __ATOMIC_ACQUIRE))
            return 0; /* woken by shutdown(), as Linux's UDP */
        ssize_t n = look_locked(s, msg, flags, &from, &lep);
        if (n >= 0) {
            if (msg->msg_name)
                cp_endpoint_to(&from, s->family, msg->msg_name, &msg->msg_namelen);
            return n;
        }
        if (n != -EAGAIN || nonblock)
            return n;
        int ms = cp_ms_until(deadline);
        if (ms == 0)
            return -EAGAIN; /* SO_RCVTIMEO ran out */
        int err = nap(s, lep, ms > 1000 ? 1000 : ms); /* -1: no deadline */
        if (err)
            return err;
    }
}

/* The circuit to addr: a peer's, or a new one asked for now (s->lock held). */
static int circuit_to(struct cp_sock *s, const struct cp_endpoint *addr, struct circuit **c)
{
    struct peer *p = find_peer(s->server, addr);
    if (!p) {
        struct cp_circuit_msg m;
        int fds[4], err = cp_ask_circuit(addr, CIRCUIT_DGRAM, &m, fds, c);
        if (err || (err = add_peer(s, *c, fds, m.id, addr)))
            return err;
        p = &((struct cp_udp_server *)s->server)->peers[((struct cp_udp_server *)s->server)->n - 1];
    }
    *c = p->c;
    return 0;
}

ssize_t cp_udp_server_sendmsg(struct cp_sock *s, const struct msghdr *msg, int flags,
                              const struct cp_endpoint *to)
{
    struct circuit *c = NULL;
    pthread_mutex_lock(&s->lock);
    int err = s->server ? circuit_to(s, to, &c) : -ENOTCONN;
    pthread_mutex_unlock(&s->lock);
    if (err)
        return err;
    ssize_t n = cp_udp_put_msg(s, c, msg, flags, to);
    return ended(n) ? -ECONNREFUSED : n; /* that peer left; recvfrom drops it */
}

/* A receive's look, taking nothing: the next datagram's size, or -errno. */
static ssize_t next_size(struct cp_sock *s)
{
    struct iovec none = {0};
    struct msghdr m = {.msg_iov = &none, .msg_iovlen = 1};
    struct cp_endpoint from;
    int lep;
    return look_locked(s, &m, MSG_PEEK | MSG_TRUNC, &from, &lep);
}

int cp_udp_server_next_size(struct cp_sock *s)
{
    ssize_t n = next_size(s);
    return n < 0 ? 0 : n > 0x7fffffff ? 0x7fffffff : (int)n;
}

bool cp_udp_server_pending(struct cp_sock *s)
{
    /* a datagram, an error a receive reports, or the 0 of a shut socket */
    return __atomic_load_n(&s->rd_shut, __ATOMIC_ACQUIRE) || next_size(s) != -EAGAIN;
}
