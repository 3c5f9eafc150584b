/*
 * preload.h - the private interface between the preload library's sources.
 *
 * libcircuits_preload.so makes the TCP sockets of an unmodified, dynamically
 * linked program circuits (docs/preload.md).  One concept per file:
 *
 *   real.c     the libc functions we wrap, found with dlsym(RTLD_NEXT), and
 *              the environment read once at load
 *   log.c      CIRCUITS_LOG=debug: one line per socket life-cycle event
 *   addr.c     sockaddr <-> protocol endpoint, CIRCUITS_BYPASS
 *   control.c  a C client of the operator's control protocol (docs/protocol.md)
 *   fdtable.c  which program descriptors are circuit sockets, and their state
 *   socket.c   socket, bind, listen, accept, close, dup, options...
 *   connect.c  connect: a CONNECT in flight until its answer comes
 *   io.c       read, write, send, recv and their vector and _chk variants
 *   poll.c     poll, ppoll, select, pselect: readiness from ring state
 *   epoll.c    epoll_create, epoll_ctl, epoll_wait: the same, for epoll
 *   udp.c      UDP sockets as datagram circuits: connect, re-connect, data
 *   udpserver.c  a UDP socket bound to a port: a server of many peers
 *   resolve.c  getaddrinfo without AI_ADDRCONFIG (a guest's addresses are
 *              its circuits', which its kernel does not show)
 *   spin.c     a bounded spin before poll and epoll sleep in the kernel
 *   fork.c     fork, exec, exit: which processes hold a circuit
 *   uring.c    io_uring refused, so libuv uses epoll_ctl and read/write
 *
 * Every circuit socket is backed by a real kernel descriptor on the number
 * the program sees: a placeholder socket of its family until it connects or
 * listens (while its CONNECT is in flight too), then the circuit's doorbell
 * (connected) or an epoll of its own control connection to the operator
 * (listening).
 */
#ifndef CIRCUITS_PRELOAD_H
#define CIRCUITS_PRELOAD_H

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "circuit.h"

#define CP_EXPORT __attribute__((visibility("default")))

/* ---- real.c ---------------------------------------------------------- */

struct cp_real {
    int (*socket)(int, int, int);
    int (*bind)(int, const struct sockaddr *, socklen_t);
    int (*listen)(int, int);
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    int (*connect)(int, const struct sockaddr *, socklen_t);
    int (*shutdown)(int, int);
    int (*close)(int);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...);
    int (*ioctl)(int, unsigned long, ...);
    int (*getsockname)(int, struct sockaddr *, socklen_t *);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*readv)(int, const struct iovec *, int);
    ssize_t (*writev)(int, const struct iovec *, int);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    int (*poll)(struct pollfd *, nfds_t, int);
    int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
    int (*pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);
    int (*epoll_create)(int);
    int (*epoll_create1)(int);
    int (*epoll_ctl)(int, int, int, struct epoll_event *);
    int (*epoll_wait)(int, struct epoll_event *, int, int);
    int (*epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
    long (*syscall)(long, ...);
    ssize_t (*sendfile)(int, int, off_t *, size_t);
    int (*recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
    int (*sendmmsg)(int, struct mmsghdr *, unsigned int, int);
    int (*epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *, const sigset_t *);
};

extern struct cp_real real;
/* Resolve the real functions and read the environment; idempotent, cheap. */
void cp_init(void);
/* CIRCUITS_CONTROL is set: new TCP sockets become circuits. */
bool cp_active(void);
const char *cp_control_path(void);
/* Move one of the library's own descriptors out of the program's way (to the
 * upper half of the descriptor limit, close-on-exec); returns its number. */
int cp_hide_fd(int fd);

/* ---- log.c ----------------------------------------------------------- */

void cp_log_init(const char *level);
bool cp_debug(void);
/* A life-cycle line to stderr when CIRCUITS_LOG=debug. */
void cp_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Always printed: what the user must know (the operator is unreachable...). */
void cp_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- addr.c ---------------------------------------------------------- */

/* A protocol endpoint (docs/protocol.md, section 3), in host form. */
struct cp_endpoint {
    uint8_t addr[16]; /* IPv6, or IPv4-mapped */
    uint16_t port;
    uint8_t proto; /* 6 = TCP */
};

#define CP_TCP 6
#define CP_UDP 17
#define CP_EP_STR 64

/* sockaddr of a socket of `family` to an endpoint; 0 or -errno. */
int cp_endpoint_from(const struct sockaddr *sa, socklen_t len, int family,
                     struct cp_endpoint *ep);
/* Endpoint to sockaddr of `family`, truncated to *len as the kernel does;
 * *len becomes the full size.  AF_INET of a non-IPv4 endpoint gives 0.0.0.0. */
void cp_endpoint_to(const struct cp_endpoint *ep, int family, struct sockaddr *sa,
                    socklen_t *len);
bool cp_endpoint_is_v4(const struct cp_endpoint *ep);
const char *cp_endpoint_str(const struct cp_endpoint *ep, char buf[CP_EP_STR]);
/* Parse CIRCUITS_BYPASS ("10.1.0.0/16,::1/128"); bad entries are warned of. */
void cp_bypass_init(const char *spec);
bool cp_bypassed(const struct cp_endpoint *ep);

/* ---- control.c ------------------------------------------------------- */

/* The fields of a CIRCUIT message a client needs. */
struct cp_circuit_msg {
    uint64_t id;
    uint16_t kind, side;
    uint64_t size[2];
    struct cp_endpoint local, remote;
};

/* A new control connection to the guest's operator, after HELLO/WELCOME. */
int cp_ctl_open(void);
/* Connections for CONNECT requests, reused; a broken one is not put back. */
int cp_ctl_get(void);
void cp_ctl_put(int fd, bool healthy);
/* LISTEN; 0 or -errno (the operator's errno, or -EPROTO for a bad reply). */
int cp_ctl_listen(int fd, const struct cp_endpoint *local, uint32_t backlog);
/* Send an ACCEPT without waiting for its reply. */
int cp_ctl_send_accept(int fd, const struct cp_endpoint *local);
/* Send a CONNECT without waiting for its reply; *request: its number. */
int cp_ctl_send_connect(int fd, const struct cp_endpoint *remote, uint32_t *request);
/*
 * The reply to that CONNECT: 0 and the circuit's message and fds, -EAGAIN if
 * it has not come and !wait, -EINTR if a signal came while waiting, or -errno
 * (the operator's, -EPROTO for a bad reply, -ECONNABORTED if it left).
 */
int cp_ctl_recv_connect(int fd, uint32_t request, bool wait, struct cp_circuit_msg *m,
                        int fds[4]);
/*
 * Receive the reply to an ACCEPT: 0 with a circuit, -EAGAIN if none is
 * waiting and !wait, -EINTR if a signal came while waiting, -errno for an
 * ERROR reply or a broken connection (-ECONNABORTED when the operator left).
 */
int cp_ctl_recv_circuit(int fd, bool wait, struct cp_circuit_msg *m, int fds[4]);
/* Attach a circuit of `kind` (CIRCUIT_STREAM or CIRCUIT_DGRAM) the operator
 * handed us; closes its memfd either way. */
int cp_ctl_attach(const struct cp_circuit_msg *m, int fds[4], int side, uint32_t kind,
                  struct circuit **out);

/* ---- fdtable.c ------------------------------------------------------- */

enum cp_state {
    CP_FRESH,     /* a placeholder kernel socket; maybe bound */
    CP_LISTENING, /* fd is a duplicate of lep, an epoll of our control connection */
    CP_CONNECTED, /* fd is a duplicate of the circuit's doorbell */
    CP_FAILED,    /* a non-blocking connect failed: so_error says why */
    CP_CONNECTING, /* a CONNECT in flight on `pending`; fd is still the placeholder */
};

struct cp_sock {
    int refs;              /* one per descriptor in the table, call in, epoll registration (atomic) */
    int family;            /* AF_INET or AF_INET6 */
    int state;             /* enum cp_state (atomic: published after what it guards) */
    bool bound;            /* bind() recorded `local` */
    bool nonblock;         /* O_NONBLOCK of the program's descriptor (atomic) */
    bool rd_shut, wr_shut; /* shutdown() of each direction */
    int so_error;          /* pending error for SO_ERROR */
    struct cp_endpoint local, remote;
    struct circuit *c; /* CP_CONNECTED */
    int peer_bell;     /* the peer's doorbell end, for hang-up (owned by c) */
    uint64_t circuit_id;
    int pending;       /* CP_CONNECTING: the control connection its answer comes on */
    uint32_t request;  /* CP_CONNECTING: the CONNECT's request number */
    int epolls;        /* registrations in epoll sets (epoll.c; atomic) */
    int ctl;           /* CP_LISTENING: our own control connection (-1: lost, see lep) */
    int lep;           /* CP_LISTENING: an epoll of ctl, on the program's descriptor */
    int timer;         /* CP_LISTENING: retries listening again after the operator left */
    uint32_t backlog;  /* CP_LISTENING: as asked, for listening again */
    bool lst_shut;     /* CP_LISTENING: shutdown() by the program: never listen again */
    struct { int rcvbuf, sndbuf, reuseaddr, reuseport, keepalive, nodelay; } opt;
    int64_t timeo_ns[2]; /* SO_RCVTIMEO, SO_SNDTIMEO of blocking calls (0: none) */
    uint32_t rx_again, tx_again; /* EAGAINs of reads and writes: epoll's edges (atomic) */
    int64_t peer_asked; /* poll.c: when the kernel was last asked about the peer (atomic) */
    int *procs;          /* processes holding the circuit, in shared memory (fork.c) */
    uint32_t fork_seen;  /* fork.c's walk that last counted this socket */
    pthread_mutex_t lock; /* connect, listen and accept on this socket */
    bool dgram;           /* a UDP socket (udp.c) */
    int fd;               /* the number it was made or last connected on */
    bool implicit;        /* UDP: connected by sendto, not connect (getpeername: ENOTCONN) */
    struct cp_endpoint peer; /* UDP: the address the program connected or sent to */
    void *retired;        /* UDP: replaced circuits a call may still use (udp.c; atomic) */
    int calls;            /* UDP: calls in flight, which may hold a circuit (atomic) */
    pthread_mutex_t rx_lock; /* UDP connected: one receive at a time, peek to consume */
    void *server;         /* UDP bound to a port: its peers (udpserver.c) */
};

struct cp_sock *cp_sock_new(int family);
/* Call fn on every circuit socket's descriptor (holding a reference). */
void cp_fd_each(void (*fn)(int fd, struct cp_sock *s, void *arg), void *arg);
/* In a forked child, first: the table's locks as if no thread held them. */
void cp_fd_after_fork(void);
/* Another lasting reference to s (cp_sock_release gives it back). */
void cp_sock_hold(struct cp_sock *s);
/* dup3 file onto fd, keeping fd's close-on-exec and s's O_NONBLOCK, if fd is
 * still s's descriptor (else nothing: the program closed that number). */
int cp_fd_put_file(int fd, struct cp_sock *s, int file);
/* Put s on descriptor fd; the table takes a reference of its own. */
int cp_fd_install(int fd, struct cp_sock *s);
/* Lock-free: may fd be a circuit socket?  false: pass the call through. */
bool cp_fd_maybe(int fd);
/* The socket on fd with a reference for the caller, or NULL. */
struct cp_sock *cp_fd_get(int fd);
/* Take fd out of the table; returns the table's reference, or NULL. */
struct cp_sock *cp_fd_remove(int fd);
/* Is s the socket on fd now?  (No reference taken.) */
bool cp_fd_is(int fd, struct cp_sock *s);
/* A call's reference (cp_fd_get's) is given back: the call has left. */
void cp_sock_put(struct cp_sock *s);
/* Another reference (the table's, an epoll registration's) is given back. */
void cp_sock_release(struct cp_sock *s);
/* A call's reference becomes a lasting one (an epoll registration). */
void cp_sock_keep(struct cp_sock *s);
/* A call on a UDP socket begins or ends without a reference of its own
 * (epoll_wait looking at a registration; a server asleep in recvfrom). */
void cp_call_enter(struct cp_sock *s);
void cp_call_leave(struct cp_sock *s);

/* ---- socket.c, shared with io.c and poll.c --------------------------- */

/* errno = -rc and -1 for a negative rc, else rc. */
static inline long cp_ret(long rc)
{
    extern int *__errno_location(void);
    if (rc < 0) {
        *__errno_location() = (int)-rc;
        return -1;
    }
    return rc;
}

/* Run `call` on the circuit socket of fd, or `pass` if fd is not one. */
#define ON_SOCKET(fd, call, pass)                   \
    do {                                            \
        cp_init();                                  \
        struct cp_sock *s = cp_fd_get(fd);          \
        if (!s)                                     \
            return pass;                            \
        ssize_t rc_ = (call);                       \
        cp_sock_put(s);                             \
        return cp_ret(rc_);                         \
    } while (0)

ssize_t cp_recv(struct cp_sock *s, void *buf, size_t len, int flags);
ssize_t cp_send(struct cp_sock *s, const void *buf, size_t len, int flags);
/* Bytes the peer has sent us so far (read or waiting): a new value is new data. */
uint64_t cp_arrived(struct cp_sock *s);

/* The operator cannot be reached (err): say so on stderr; -ENETUNREACH. */
int cp_unreachable(int err);
/* Ask the operator for a circuit of `kind` to ep: 0, the CIRCUIT message,
 * its descriptors and the attached circuit (side 0), or -errno. */
int cp_ask_circuit(const struct cp_endpoint *ep, uint32_t kind, struct cp_circuit_msg *m,
                   int fds[4], struct circuit **c);
/* Leave fd's descriptor as it was at socket(): a kernel placeholder. */
int cp_placeholder(int fd, struct cp_sock *s);
/* The kernel keeps fd from now on: it is a plain socket again. */
void cp_hand_back(int fd, const char *why);

/* ---- connect.c ---------------------------------------------------------- */

/* Ask the operator for a circuit to ep, wait for it and put it on fd
 * (s->lock held); a refusal leaves s fresh. */
int cp_connect_circuit(int fd, struct cp_sock *s, const struct cp_endpoint *ep);
/* A CONNECT in flight: take its answer if it came (wait: once it comes).
 * 0 once s is no longer CP_CONNECTING, -EAGAIN while it is, -EINTR if a
 * signal handler ran while waiting. */
int cp_connect_settle(struct cp_sock *s, bool wait);
/* The last reference to s is gone with its CONNECT in flight. */
void cp_connect_abandon(struct cp_sock *s);
/* Before fork: wait for every connect in flight (an answer would reach one
 * process only), so that parent and child hold the same circuit. */
void cp_connect_settle_all(void);

/* ---- udp.c: UDP sockets, called from socket.c and io.c ---------------- */

bool cp_udp_kind(int domain, int type, int protocol);
/* connect: 0 or -errno, or CP_HAND_BACK (a CIRCUITS_BYPASS address: the
 * kernel's socket from now on). */
#define CP_HAND_BACK 1
int cp_udp_connect(int fd, struct cp_sock *s, const struct sockaddr *addr, socklen_t len);
ssize_t cp_udp_recvmsg(struct cp_sock *s, struct msghdr *msg, int flags);
ssize_t cp_udp_sendmsg(struct cp_sock *s, const struct msghdr *msg, int flags);
ssize_t cp_udp_recv(struct cp_sock *s, void *buf, size_t len, int flags, struct sockaddr *addr,
                    socklen_t *alen);
ssize_t cp_udp_send(struct cp_sock *s, const void *buf, size_t len, int flags,
                    const struct sockaddr *addr, socklen_t alen);
/* shutdown(how) of a UDP socket: 0, or -ENOTCONN if unconnected (it is
 * shut all the same, and blocked receivers wake and return 0, as Linux's). */
int cp_udp_shutdown(struct cp_sock *s, int how);
/* FIONREAD of a connected UDP socket: the next datagram's size, or 0. */
int cp_udp_next_size(struct cp_sock *s);
/* The last reference is gone: end a UDP server, unmap replaced circuits. */
void cp_udp_free(struct cp_sock *s);
/* A circuit replaced or dropped: unmapped now, or when no call can hold it. */
void cp_udp_retire(struct cp_sock *s, struct circuit *old);
/* The last call in flight left: unmap the retired circuits if none came in. */
void cp_udp_reap(struct cp_sock *s);
/* The next datagram of c into msg, as recvmsg says it (without the name). */
ssize_t cp_udp_take(struct cp_sock *s, struct circuit *c, struct msghdr *msg, int flags);
/* msg as one datagram into c, to the peer `to`; as sendmsg says it. */
ssize_t cp_udp_put_msg(struct cp_sock *s, struct circuit *c, const struct msghdr *msg,
                       int flags, const struct cp_endpoint *to);
/* The UDP endpoint a program names; 0 or -errno. */
int cp_udp_endpoint(struct cp_sock *s, const struct sockaddr *addr, socklen_t len,
                    struct cp_endpoint *ep);

/* ---- udpserver.c: a bound UDP socket serving many peers ---------------- */

/* LISTEN on s->local and put the server's epoll on fd (s->lock held). */
int cp_udp_serve(int fd, struct cp_sock *s);
/* connect() of a server to one of its peers: that peer's circuit becomes the
 * socket's (datagrams already in it stay), the others end; -ENOENT if addr
 * is no peer (s->lock held). */
int cp_udp_adopt(struct cp_sock *s, const struct cp_endpoint *addr);
/* End serving: every peer's circuit, the listener (s->lock held). */
void cp_udp_unserve(struct cp_sock *s);
ssize_t cp_udp_server_recvmsg(struct cp_sock *s, struct msghdr *msg, int flags);
ssize_t cp_udp_server_sendmsg(struct cp_sock *s, const struct msghdr *msg, int flags,
                              const struct cp_endpoint *to);
/* FIONREAD: the size of the datagram a receive would take now, or 0. */
int cp_udp_server_next_size(struct cp_sock *s);
/* shutdown() of reading: the server's descriptor turns readable for good,
 * waking receivers, which return 0 (s->lock held). */
void cp_udp_server_shut(struct cp_sock *s);
/* Would a receive return at once?  poll's check of the kernel's word that
 * the server's descriptor is readable (a peer that left wakes it too). */
bool cp_udp_server_pending(struct cp_sock *s);

/* ---- poll.c, shared with epoll.c ------------------------------------- */

/* A connecting, connected or failed circuit socket: its readiness is ours to compute. */
bool cp_computed(struct cp_sock *s);
/* Its readiness now, as poll bits (the same values as epoll's), within events. */
short cp_revents(struct cp_sock *s, short events, bool ask_kernel);
/* Make its doorbell ring when what events asks for may have come; `edge`:
 * for a watcher of the doorbell's edges and the peer's hang-up (epoll.c),
 * which costs no system call while the circuit is still armed. */
void cp_arm(struct cp_sock *s, short events, bool edge);
int64_t cp_now_ns(void);
/* When a blocking call on s gives up: SO_SNDTIMEO (sending) or SO_RCVTIMEO
 * from now, or CIRCUIT_FOREVER if none is set. */
int64_t cp_deadline(struct cp_sock *s, bool sending);
/* Milliseconds to poll for until deadline (-1: no deadline), rounded up; 0 once past. */
int cp_ms_until(int64_t deadline);
/* Time to ask the kernel whether s's peer vanished (at most once a
 * millisecond while it is ready): true once, then false for a while. */
bool cp_ask_due(struct cp_sock *s, int64_t now);

/* ---- spin.c, for poll.c and epoll.c ----------------------------------- */

/* Call ready(arg) until it says true (true) or a short while, at most until
 * deadline (-1: none), has passed (false).  No spin on a single CPU. */
bool cp_spin(bool (*ready)(void *), void *arg, int64_t deadline);

/* ---- fork.c ---------------------------------------------------------- */

/* A process count of 1 for a new circuit, in shared memory (NULL: none). */
int *cp_procs_new(void);
/* Count this process out of s's circuit: true if it was the last holder. */
bool cp_procs_leave(struct cp_sock *s);

/* ---- epoll.c ----------------------------------------------------------- */

/* close() of fd: forget it as an epoll instance and as a registered socket. */
void cp_epoll_closed(int fd, bool was_circuit);
/* s changed state (s->lock held): its registrations leave the descriptors
 * they watched for those of the new state, and sleepers look again. */
void cp_epoll_follow(struct cp_sock *s);
/* Before s closes descriptors its registrations may watch (a UDP server's
 * epoll): take them off; cp_epoll_follow puts them on the new ones. */
void cp_epoll_unhook(struct cp_sock *s);
/* fd was handed back to the kernel: its registrations become the kernel's. */
void cp_epoll_handed_back(int fd, struct cp_sock *s);
/* Around fork: take every lock of epoll.c's (a looping epoll_wait holds its
 * set's), and give them back in parent and child, so the child inherits none
 * held by a thread it does not have. */
void cp_epoll_before_fork(void);
void cp_epoll_after_fork(void);

#endif
