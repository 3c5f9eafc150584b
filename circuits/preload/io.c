/*
 * io.c - data on circuit sockets: read, write, recv, send, their vector
 * forms and the _chk variants that FORTIFY_SOURCE builds call.
 *
 * Each call on a circuit socket becomes one circuit_recv or circuit_send of
 * the C ring core; blocking calls wait inside the core (spin briefly, then
 * sleep on the doorbell), which returns -EINTR when a signal handler ran.
 * The core's answers become what the kernel would say to a TCP socket:
 * end of data reads 0, a closed peer is EPIPE (and SIGPIPE unless
 * MSG_NOSIGNAL), a vanished or aborted one ECONNRESET.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <unistd.h>

#include "preload.h"

static int state_of(struct cp_sock *s) { return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE); }

static int core_flags(struct cp_sock *s, int flags)
{
    bool nonblock = (flags & MSG_DONTWAIT) || __atomic_load_n(&s->nonblock, __ATOMIC_RELAXED);
    return nonblock ? CIRCUIT_NONBLOCK : 0;
}

/* What a socket that is not connected says to a data call. */
static long not_connected(struct cp_sock *s)
{
    int err = __atomic_exchange_n(&s->so_error, 0, __ATOMIC_ACQ_REL);
    return err ? -err : -ENOTCONN;
}

/* MSG_PEEK: copy what is there without consuming it. */
static ssize_t peek(struct cp_sock *s, void *buf, size_t len, int cflags)
{
    void *ptr;
    ssize_t n = circuit_peek(s->c, cflags, cp_deadline(s, false), &ptr);
    if (n > 0) {
        n = (size_t)n < len ? n : (ssize_t)len;
        memcpy(buf, ptr, (size_t)n);
    }
    return n;
}

/*
 * A non-blocking call that would be refused, told without entering the ring
 * core: refusing there arms the doorbell (a drain and a look at the peer,
 * two system calls) for pollers of its level, and our poll and epoll arm by
 * themselves before they sleep.  The kernel is still asked now and then
 * whether the peer vanished, so a program that only retries learns it.
 */
static bool refused(struct cp_sock *s, int cflags, int condition)
{
    if (!(cflags & CIRCUIT_NONBLOCK))
        return false;
    int m = cp_ask_due(s, cp_now_ns()) ? circuit_poll(s->c) : circuit_poll_known(s->c);
    return !(m & condition);
}

/* A connect still in flight: a blocking call waits for its answer (EINTR
 * if a signal handler ran meanwhile), a non-blocking one says EAGAIN, as the
 * kernel's before the handshake ends; 0 once it is settled. */
static int in_flight(struct cp_sock *s, int flags, uint32_t *again)
{
    int err = cp_connect_settle(s, !(core_flags(s, flags) & CIRCUIT_NONBLOCK));
    if (err == -EAGAIN)
        __atomic_add_fetch(again, 1, __ATOMIC_RELEASE);
    return err;
}

ssize_t cp_recv(struct cp_sock *s, void *buf, size_t len, int flags)
{
    if (s->dgram)
        return cp_udp_recv(s, buf, len, flags, NULL, NULL);
    int err = in_flight(s, flags, &s->rx_again);
    if (err)
        return err;
    if (state_of(s) != CP_CONNECTED)
        return not_connected(s);
    if (s->rd_shut)
        return 0;
    int cflags = core_flags(s, flags) | (flags & MSG_WAITALL ? CIRCUIT_ALL : 0);
    ssize_t n = refused(s, cflags, CIRCUIT_READABLE) ? -EAGAIN
                : flags & MSG_PEEK ? peek(s, buf, len, cflags)
                                   : circuit_recv(s->c, buf, len, cflags, cp_deadline(s, false));
    if (n == -ESHUTDOWN)
        return 0; /* end of data */
    if (n == -EAGAIN || n == -ETIMEDOUT) {
        __atomic_add_fetch(&s->rx_again, 1, __ATOMIC_RELEASE);
        return -EAGAIN;
    }
    return n;
}

ssize_t cp_send(struct cp_sock *s, const void *buf, size_t len, int flags)
{
    if (s->dgram)
        return cp_udp_send(s, buf, len, flags, NULL, 0);
    int err = in_flight(s, flags, &s->tx_again);
    if (err)
        return err;
    if (state_of(s) != CP_CONNECTED)
        return state_of(s) == CP_FAILED ? not_connected(s) : -ENOTCONN;
    ssize_t n = s->wr_shut ? -EPIPE : 0;
    if (!n) {
        /* Blocking: all of it, as the kernel does; non-blocking: what fits. */
        int cflags = core_flags(s, flags);
        n = refused(s, cflags, CIRCUIT_WRITABLE)
                ? -EAGAIN
                : circuit_send(s->c, buf, len, cflags ? cflags : CIRCUIT_ALL, cp_deadline(s, true));
    }
    if (n == -EPIPE && !(flags & MSG_NOSIGNAL))
        raise(SIGPIPE);
    if (n == -EAGAIN || n == -ETIMEDOUT) {
        __atomic_add_fetch(&s->tx_again, 1, __ATOMIC_RELEASE);
        return -EAGAIN;
    }
    return n;
}

uint64_t cp_arrived(struct cp_sock *s)
{
    void *ptr;
    if (state_of(s) != CP_CONNECTED)
        return 0;
    ssize_t n = circuit_peek(s->c, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &ptr);
    return circuit_bytes_received(s->c) + (n > 0 ? (uint64_t)n : 0);
}

/* ---- vectors: one buffer at a time -------------------------------------- */

/*
 * Receive into, or send from, each buffer in turn, stopping at a short one.
 * Once some bytes moved, an error is not reported (the count is), a receive
 * no longer waits, and a send no longer raises SIGPIPE.
 */
static ssize_t each_buffer(struct cp_sock *s, const struct iovec *iov, int cnt, int flags,
                           bool sending)
{
    ssize_t done = 0;
    if (cnt < 0 || cnt > IOV_MAX)
        return -EINVAL;
    for (int i = 0; i < cnt; i++) {
        if (!iov[i].iov_len)
            continue;
        int f = done ? flags | (sending ? MSG_NOSIGNAL : MSG_DONTWAIT) : flags;
        ssize_t n = sending ? cp_send(s, iov[i].iov_base, iov[i].iov_len, f)
                            : cp_recv(s, iov[i].iov_base, iov[i].iov_len, f);
        if (n < 0)
            return done ? done : n;
        done += n;
        if ((size_t)n < iov[i].iov_len)
            break;
    }
    return done;
}

/* A datagram socket's vector is one datagram: udp.c. */
static struct msghdr of_iov(const struct iovec *iov, int cnt)
{
    return (struct msghdr){.msg_iov = (struct iovec *)iov, .msg_iovlen = cnt < 0 ? SIZE_MAX : (size_t)cnt};
}

static ssize_t recv_iov(struct cp_sock *s, const struct iovec *iov, int cnt, int flags)
{
    if (s->dgram) {
        struct msghdr m = of_iov(iov, cnt);
        return cp_udp_recvmsg(s, &m, flags);
    }
    return each_buffer(s, iov, cnt, flags, false);
}

static ssize_t send_iov(struct cp_sock *s, const struct iovec *iov, int cnt, int flags)
{
    if (s->dgram) {
        struct msghdr m = of_iov(iov, cnt);
        return cp_udp_sendmsg(s, &m, flags);
    }
    return each_buffer(s, iov, cnt, flags, true);
}

/* ---- the wrappers --------------------------------------------------------- */

CP_EXPORT ssize_t read(int fd, void *buf, size_t len)
{
    ON_SOCKET(fd, cp_recv(s, buf, len, 0), real.read(fd, buf, len));
}

CP_EXPORT ssize_t write(int fd, const void *buf, size_t len)
{
    ON_SOCKET(fd, cp_send(s, buf, len, 0), real.write(fd, buf, len));
}

CP_EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
    ON_SOCKET(fd, recv_iov(s, iov, cnt, 0), real.readv(fd, iov, cnt));
}

CP_EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    ON_SOCKET(fd, send_iov(s, iov, cnt, 0), real.writev(fd, iov, cnt));
}

CP_EXPORT ssize_t recv(int fd, void *buf, size_t len, int flags)
{
    ON_SOCKET(fd, cp_recv(s, buf, len, flags), real.recv(fd, buf, len, flags));
}

CP_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags)
{
    ON_SOCKET(fd, cp_send(s, buf, len, flags), real.send(fd, buf, len, flags));
}

/* A stream socket has no source address to report: *alen becomes 0. */
static ssize_t recv_from(struct cp_sock *s, void *buf, size_t len, int flags,
                         struct sockaddr *addr, socklen_t *alen)
{
    if (s->dgram)
        return cp_udp_recv(s, buf, len, flags, addr, alen);
    ssize_t n = cp_recv(s, buf, len, flags);
    if (n >= 0 && alen)
        *alen = 0;
    return n;
}

CP_EXPORT ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
                           socklen_t *alen)
{
    ON_SOCKET(fd, recv_from(s, buf, len, flags, addr, alen),
              real.recvfrom(fd, buf, len, flags, addr, alen));
}

/* A destination given to a connected stream socket is ignored, as by TCP. */
CP_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags,
                         const struct sockaddr *addr, socklen_t alen)
{
    ON_SOCKET(fd, s->dgram ? cp_udp_send(s, buf, len, flags, addr, alen) : cp_send(s, buf, len, flags),
              real.sendto(fd, buf, len, flags, addr, alen));
}

static ssize_t recv_msg(struct cp_sock *s, struct msghdr *msg, int flags)
{
    if (s->dgram)
        return cp_udp_recvmsg(s, msg, flags);
    ssize_t n = recv_iov(s, msg->msg_iov, (int)msg->msg_iovlen, flags);
    if (n >= 0) {
        msg->msg_namelen = 0;
        msg->msg_controllen = 0; /* no ancillary data travels on a circuit */
        msg->msg_flags = 0;
    }
    return n;
}

CP_EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    ON_SOCKET(fd, recv_msg(s, msg, flags), real.recvmsg(fd, msg, flags));
}

static ssize_t send_msg(struct cp_sock *s, const struct msghdr *msg, int flags)
{
    if (s->dgram)
        return cp_udp_sendmsg(s, msg, flags);
    if (msg->msg_controllen)
        return -EOPNOTSUPP; /* descriptors and the like cannot cross a circuit */
    return send_iov(s, msg->msg_iov, (int)msg->msg_iovlen, flags);
}

CP_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    ON_SOCKET(fd, send_msg(s, msg, flags), real.sendmsg(fd, msg, flags));
}

/*
 * recvmmsg and sendmmsg: one message after another.  After the first, a
 * receive no longer waits (the kernel's MSG_WAITFORONE, which a stream's
 * timeout-less recvmmsg behaves like once data came) and a send stops at the
 * first short or failed one; an error after some messages is not reported.
 */
static int each_msg(struct cp_sock *s, struct mmsghdr *v, unsigned n, int flags, bool sending)
{
    unsigned i = 0;
    for (; i < n; i++) {
        int f = i ? flags | (sending ? MSG_NOSIGNAL : MSG_DONTWAIT) : flags & ~MSG_WAITFORONE;
        ssize_t r = sending ? send_msg(s, &v[i].msg_hdr, f) : recv_msg(s, &v[i].msg_hdr, f);
        if (r < 0)
            return i ? (int)i : (int)r;
        v[i].msg_len = (unsigned)r;
        if (r == 0 && !sending && !s->dgram)
            return (int)i + 1; /* end of data: nothing more will come */
        if (sending && !r && !s->dgram)
            break;
    }
    return (int)i;
}

CP_EXPORT int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *timeout)
{
    ON_SOCKET(fd, each_msg(s, v, n, flags, false), real.recvmmsg(fd, v, n, flags, timeout));
}

CP_EXPORT int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
{
    ON_SOCKET(fd, each_msg(s, v, n, flags, true), real.sendmmsg(fd, v, n, flags));
}

/* ---- FORTIFY_SOURCE: the checks first, then the call ------------------ */

static void overflow(void)
{
    cp_warn("buffer overflow detected");
    abort();
}

CP_EXPORT ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen)
{
    if (len > buflen)
        overflow();
    return read(fd, buf, len);
}

CP_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags)
{
    if (len > buflen)
        overflow();
    return recv(fd, buf, len, flags);
}

CP_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                                 struct sockaddr *addr, socklen_t *alen)
{
    if (len > buflen)
        overflow();
    return recvfrom(fd, buf, len, flags, addr, alen);
}

/* ---- sendfile: read from the file, write into the circuit --------------- */

#define SENDFILE_CHUNK (64 * 1024)

/*
 * What sendfile(2) does to a socket, done by hand: the kernel cannot splice
 * a file into a ring it does not know.  Bytes are read with pread at the
 * file offset (ours, or the file's own position, which is then moved past
 * what was sent, never past what the circuit took).  Blocking: all of it;
 * non-blocking: what fits, EAGAIN only if nothing did.
 */
static ssize_t send_file(struct cp_sock *s, int in_fd, off_t *offset, size_t count)
{
    off_t off = offset ? *offset : lseek(in_fd, 0, SEEK_CUR);
    if (off < 0)
        return -errno;
    char *buf = malloc(SENDFILE_CHUNK);
    if (!buf)
        return -ENOMEM;
    ssize_t done = 0, err = 0;
    while ((size_t)done < count) {
        size_t want = count - (size_t)done < SENDFILE_CHUNK ? count - (size_t)done : SENDFILE_CHUNK;
        ssize_t got = pread(in_fd, buf, want, off + done);
        if (got <= 0) {
            err = got < 0 ? -errno : 0;
            break; /* end of file: what was sent is the answer */
        }
        ssize_t sent = cp_send(s, buf, (size_t)got, done ? MSG_NOSIGNAL : 0);
        if (sent < 0) {
            err = sent;
            break;
        }
        done += sent;
        if (sent < got)
            break; /* the ring is full: a non-blocking socket says so next time */
    }
    free(buf);
    if (done && offset)
        *offset = off + done;
    else if (done)
        lseek(in_fd, off + done, SEEK_SET);
    return done ? done : err;
}

CP_EXPORT ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
{
    ON_SOCKET(out_fd, send_file(s, in_fd, offset, count),
              real.sendfile(out_fd, in_fd, offset, count));
}

/* off_t is 64 bits on every target we build for: the same call. */
CP_EXPORT ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count)
{
    return sendfile(out_fd, in_fd, offset, count);
}
