/*
 * control.c - a C client of the operator's control protocol, version 1.
 *
 * Written from docs/protocol.md: 16-byte little-endian header, one message
 * per SOCK_SEQPACKET packet, descriptors with SCM_RIGHTS.  The operator is
 * trusted to set circuits up, but its replies are still checked field by
 * field: a malformed reply gives -EPROTO (and its descriptors are closed),
 * never a crash.
 *
 * Connections: each listening socket has its own (an ACCEPT may wait for
 * long; the program's descriptor is a duplicate of it, so it polls readable
 * when a reply arrives).  CONNECTs share a small pool of connections:
 * threads connecting at once each take their own, so none waits for
 * another's reply, and a connect in flight keeps its own until the answer
 * comes (connect.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "preload.h"

#define VERSION 1
#define HEADER 16
#define MAX_MESSAGE 4096
#define MAX_FDS 4
#define REPLY_TIMEOUT_MS 10000 /* the operator answers at once; a stuck one is an error */
/* ...but a CONNECT to the outside once the host's handshake is done, within
 * its connect_timeout (30 s by default): wait as long as the kernel's own
 * connect would (tcp_syn_retries 6: 127 s). */
#define CONNECT_TIMEOUT_MS 130000
#define POOL_MAX 8

enum { HELLO = 1, WELCOME, LISTEN, UNLISTEN, CONNECT, CIRCUIT, CLOSE, OK, ERROR, ACCEPT };

struct msg {
    uint16_t type;
    uint32_t request;
    const uint8_t *body;
    size_t len;
    uint8_t raw[MAX_MESSAGE + 1];
};

static uint32_t next_request = 1;

/* ---- little-endian fields -------------------------------------------- */

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v), put16(p + 2, (uint16_t)(v >> 16)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

static void put_endpoint(uint8_t *p, const struct cp_endpoint *ep)
{
    memcpy(p, ep->addr, 16);
    put16(p + 16, ep->port);
    p[18] = ep->proto;
    p[19] = 0;
}

static bool get_endpoint(const uint8_t *p, struct cp_endpoint *ep)
{
    memcpy(ep->addr, p, 16);
    ep->port = get16(p + 16);
    ep->proto = p[18];
    return (ep->proto == 6 || ep->proto == 17) && p[19] == 0;
}

/* ---- packets ---------------------------------------------------------- */

static int wait_for(int fd, short events, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = events};
    int n = real.poll(&p, 1, timeout_ms);
    if (n < 0)
        return -errno;
    return n == 0 ? -ETIMEDOUT : 0;
}

static int send_msg(int fd, uint16_t type, uint32_t request, const uint8_t *body, size_t len)
{
    uint8_t buf[HEADER + 64];
    if (len > sizeof(buf) - HEADER)
        return -EINVAL;
    memset(buf, 0, HEADER);
    put16(buf, VERSION);
    put16(buf + 2, type);
    put32(buf + 4, (uint32_t)(HEADER + len));
    put32(buf + 8, request);
    memcpy(buf + HEADER, body, len);
    for (;;) {
        /* MSG_DONTWAIT: a listener's connection shares its file description
         * with the program's descriptor, whose O_NONBLOCK we do not own. */
        ssize_t n = real.send(fd, buf, HEADER + len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == (ssize_t)(HEADER + len))
            return 0;
        if (n >= 0)
            return -EPROTO;
        int err = errno;
        if (err == EINTR)
            continue;
        if (err != EAGAIN)
            return err == EPIPE || err == ECONNRESET ? -ECONNABORTED : -err;
        if ((err = wait_for(fd, POLLOUT, REPLY_TIMEOUT_MS)) && err != -EINTR)
            return err;
    }
}

static void close_fds(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            real.close(fds[i]);
}

/* The descriptors of an SCM_RIGHTS message; -EPROTO if more than MAX_FDS came. */
static int take_fds(struct msghdr *mh, int fds[MAX_FDS])
{
    int n = 0, extra = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            if (n < MAX_FDS)
                fds[n++] = cp_hide_fd(fd);
            else
                real.close(fd), extra++;
        }
    }
    if (extra || (mh->msg_flags & MSG_CTRUNC)) {
        close_fds(fds, n);
        return -EPROTO;
    }
    return n;
}

/* Check the header against the packet (docs/protocol.md, section 2). */
static int check_header(struct msg *m, ssize_t n, int nfds)
{
    const uint8_t *h = m->raw;
    if (n < HEADER || n > MAX_MESSAGE || get16(h) != VERSION || get32(h + 4) != (uint32_t)n ||
        h[12] != nfds || h[13] || get16(h + 14))
        return -EPROTO;
    m->type = get16(h + 2);
    m->request = get32(h + 8);
    m->body = h + HEADER;
    m->len = (size_t)n - HEADER;
    return 0;
}

/*
 * One packet: 0 and its descriptors in fds[0..*nfds), or -EAGAIN (nothing,
 * !wait), -EINTR, -ETIMEDOUT, -ECONNABORTED (the operator closed), -EPROTO.
 */
static int recv_msg(int fd, bool wait, int timeout_ms, struct msg *m, int fds[MAX_FDS],
                    int *nfds)
{
    union {
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    for (;;) {
        struct iovec iov = {.iov_base = m->raw, .iov_len = sizeof(m->raw)};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                            .msg_controllen = sizeof(ctl.buf)};
        ssize_t n = real.recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            int err = errno;
            if (err == EINTR)
                continue;
            if (err != EAGAIN)
                return err == ECONNRESET ? -ECONNABORTED : -err;
            if (!wait)
                return -EAGAIN;
            if ((err = wait_for(fd, POLLIN, timeout_ms)))
                return err;
            continue;
        }
        int got = take_fds(&mh, fds);
        if (got < 0)
            return got;
        if (n == 0 && got == 0)
            return -ECONNABORTED;
        if ((mh.msg_flags & MSG_TRUNC) || check_header(m, n, got)) {
            close_fds(fds, got);
            return -EPROTO;
        }
        *nfds = got;
        return 0;
    }
}

/* An ERROR reply's errno (1..4095), or -EPROTO if the reply is malformed. */
static int error_of(const struct msg *m)
{
    if (m->len < 6 || get16(m->body + 4) != m->len - 6)
        return -EPROTO;
    uint32_t code = get32(m->body);
    return code >= 1 && code < 4096 ? -(int)code : -EPROTO;
}

/* Send a request and wait for its reply, which must carry no descriptors. */
static int request(int fd, uint16_t type, const uint8_t *body, size_t len, struct msg *reply)
{
    uint32_t id = __atomic_fetch_add(&next_request, 1, __ATOMIC_RELAXED);
    int fds[MAX_FDS], nfds = 0;
    int err = send_msg(fd, type, id, body, len);
    /* Signals do not cut a request short: its reply would then be left
     * unread on the connection.  The operator answers at once anyway. */
    while (!err && (err = recv_msg(fd, true, REPLY_TIMEOUT_MS, reply, fds, &nfds)) == -EINTR)
        ;
    if (err)
        return err;
    close_fds(fds, nfds);
    if (reply->request != id || nfds)
        return -EPROTO;
    return reply->type == ERROR ? error_of(reply) : 0;
}

/* ---- requests --------------------------------------------------------- */

int cp_ctl_open(void)
{
    const char *path = cp_control_path();
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (!path || strlen(path) >= sizeof(sun.sun_path))
        return -EINVAL;
    strcpy(sun.sun_path, path);
    int fd = cp_hide_fd(real.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (fd < 0)
        return -errno;
    if (real.connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        int err = -errno;
        real.close(fd);
        return err;
    }
    uint8_t hello[8] = {0};
    put16(hello, VERSION);
    put16(hello + 2, VERSION);
    struct msg reply;
    int err = request(fd, HELLO, hello, sizeof(hello), &reply);
    if (!err && (reply.type != WELCOME || reply.len < 6 || get16(reply.body) != VERSION))
        err = -EPROTO;
    if (err) {
        real.close(fd);
        return err;
    }
    return fd;
}

int cp_ctl_listen(int fd, const struct cp_endpoint *local, uint32_t backlog)
{
    uint8_t body[28];
    put_endpoint(body, local);
    put32(body + 20, backlog);
    put32(body + 24, 0); /* the operator's default ring size */
    struct msg reply;
    int err = request(fd, LISTEN, body, sizeof(body), &reply);
    return err ? err : reply.type == OK && reply.len == 0 ? 0 : -EPROTO;
}

int cp_ctl_send_accept(int fd, const struct cp_endpoint *local)
{
    uint8_t body[20];
    put_endpoint(body, local);
    return send_msg(fd, ACCEPT, __atomic_fetch_add(&next_request, 1, __ATOMIC_RELAXED), body,
                    sizeof(body));
}

/* A CIRCUIT message with its 4 descriptors (trunk 0: a local guest). */
static int parse_circuit(const struct msg *m, int nfds, struct cp_circuit_msg *c)
{
    const uint8_t *b = m->body;
    if (m->type == ERROR)
        return error_of(m);
    if (m->type != CIRCUIT || m->len != 96 || nfds != MAX_FDS)
        return -EPROTO;
    c->id = get64(b);
    c->kind = get16(b + 8);
    c->side = get16(b + 10);
    c->size[0] = get64(b + 16);
    c->size[1] = get64(b + 24);
    if (get32(b + 12) || !get_endpoint(b + 32, &c->local) || !get_endpoint(b + 52, &c->remote) ||
        get32(b + 72) || get32(b + 76) || get64(b + 80) || get64(b + 88) || c->side > 1)
        return -EPROTO;
    return 0;
}

/* Keep the fds of a good CIRCUIT, close those of anything else. */
static int circuit_reply(const struct msg *m, int got[MAX_FDS], int nfds,
                         struct cp_circuit_msg *c, int fds[4])
{
    int err = parse_circuit(m, nfds, c);
    if (err) {
        close_fds(got, nfds);
        return err;
    }
    memcpy(fds, got, 4 * sizeof(int));
    return 0;
}

int cp_ctl_send_connect(int fd, const struct cp_endpoint *remote, uint32_t *request)
{
    uint8_t body[24];
    put_endpoint(body, remote);
    put32(body + 20, 0);
    *request = __atomic_fetch_add(&next_request, 1, __ATOMIC_RELAXED);
    return send_msg(fd, CONNECT, *request, body, sizeof(body));
}

int cp_ctl_recv_connect(int fd, uint32_t request, bool wait, struct cp_circuit_msg *c,
                        int fds[4])
{
    struct msg m;
    int got[MAX_FDS], nfds = 0;
    int err = recv_msg(fd, wait, CONNECT_TIMEOUT_MS, &m, got, &nfds);
    if (err)
        return err;
    if (m.request != request) {
        close_fds(got, nfds);
        return -EPROTO;
    }
    return circuit_reply(&m, got, nfds, c, fds);
}

int cp_ctl_recv_circuit(int fd, bool wait, struct cp_circuit_msg *c, int fds[4])
{
    struct msg m;
    int got[MAX_FDS], nfds = 0;
    int err = recv_msg(fd, wait, -1, &m, got, &nfds);
    return err ? err : circuit_reply(&m, got, nfds, c, fds);
}

int cp_ctl_attach(const struct cp_circuit_msg *m, int fds[4], int side, uint32_t kind,
                  struct circuit **out)
{
    struct circuit_params p = {.kind = m->kind, .size = {m->size[0], m->size[1]}};
    struct circuit_fds cf = {.bell = fds[1], .self_bell = fds[2], .peer_bell = fds[3]};
    int err = m->kind != kind || m->side != side ? -EPROTO
                                                           : circuit_attach(fds[0], &cf, &p, side, out);
    real.close(fds[0]); /* mapped now (or refused): the memfd itself is not needed */
    if (err)
        close_fds(fds + 1, 3);
    return err;
}

/* ---- the pool of connections for CONNECT ------------------------------ */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static int pool[POOL_MAX], pooled;

int cp_ctl_get(void)
{
    pthread_mutex_lock(&pool_lock);
    int fd = pooled ? pool[--pooled] : -1;
    pthread_mutex_unlock(&pool_lock);
    return fd >= 0 ? fd : cp_ctl_open();
}

void cp_ctl_put(int fd, bool healthy)
{
    pthread_mutex_lock(&pool_lock);
    if (healthy && pooled < POOL_MAX) {
        pool[pooled++] = fd;
        fd = -1;
    }
    pthread_mutex_unlock(&pool_lock);
    if (fd >= 0)
        real.close(fd);
}

/* A forked child must not share the parent's connections: replies would go
 * to whichever process reads first.  It opens its own when it connects. */
static void pool_after_fork(void)
{
    pthread_mutex_init(&pool_lock, NULL);
    close_fds(pool, pooled);
    pooled = 0;
}

__attribute__((constructor)) static void pool_init(void)
{
    pthread_atfork(NULL, NULL, pool_after_fork);
}
