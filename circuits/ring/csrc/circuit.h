/*
 * circuit.h - the circuit data plane: one endpoint of a shared-memory circuit.
 *
 * A circuit joins two sides through one shared-memory object (format.h).
 * Side s produces into direction s and consumes from direction 1 - s.
 * Each side has a doorbell, a connected AF_UNIX stream socket pair: it
 * sleeps on one end ("bell", also what poll-style callers watch) and rings
 * itself through the other ("self_bell"); the peer holds a duplicate of that
 * other end to ring it ("peer_bell" on the peer's side).  The doorbell's
 * hang-up tells the peer that this side is gone (bell.c).
 *
 * Life of an endpoint:
 *   circuit_create()  makes the memory object (the operator, or a test, does this)
 *   circuit_attach()  maps it for one side, checking it against trusted params
 *   circuit_send/recv, or circuit_reserve/commit and circuit_peek/consume
 *   circuit_shutdown_write(), circuit_close() end the conversation
 *   circuit_free()    unmaps; nothing may touch views into the data areas after
 *
 * Every call returns a non-negative count or a negative errno:
 *   -EAGAIN      CIRCUIT_NONBLOCK was given and the call would wait
 *   -ETIMEDOUT   the deadline passed
 *   -EINTR       a signal arrived while sleeping; call again
 *   -ESHUTDOWN   (receive side) end of data: the peer shut down writing and
 *                everything it wrote has been consumed
 *   -EPIPE       (send side) the peer has closed
 *   -ECONNRESET  the peer aborted or vanished, or the circuit was aborted
 *                because the peer broke the format (a hostile peer)
 *   -EMSGSIZE    a datagram larger than the ring can ever hold
 *   -EBADF       this endpoint was closed
 *   -EINVAL      a bad argument (never caused by the peer)
 *
 * Deadlines are absolute CLOCK_MONOTONIC nanoseconds; CIRCUIT_FOREVER waits
 * without limit.  Waiting spins for at most spin_ns, then sleeps on the doorbell.
 * Each endpoint's calls are thread-safe; one direction is used by one thread
 * at a time (a second sender waits for the first).
 */
#ifndef CIRCUITS_CIRCUIT_H
#define CIRCUITS_CIRCUIT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "format.h"

struct circuit;

/* What both sides must agree on; it comes from a trusted party, never the peer. */
struct circuit_params {
    uint32_t kind;     /* CIRCUIT_STREAM or CIRCUIT_DGRAM */
    uint64_t size[2];  /* data area of direction 0 and of direction 1 */
};

#define CIRCUIT_FOREVER (-1LL)
#define CIRCUIT_NONBLOCK 1 /* flag: never wait */
#define CIRCUIT_ALL 2      /* flag: send or receive the whole buffer */

/* Size of the memory object that params describe, or 0 if params are invalid. */
uint64_t circuit_object_size(const struct circuit_params *p);

/* Create a sealed memfd holding an initialised circuit.  Returns fd or -errno. */
int circuit_create(const struct circuit_params *p);

/*
 * Create a circuit and both sides' descriptors (endpoints.c): side0 and
 * side1 each get [memfd, bell, self_bell, peer_bell], all new and
 * close-on-exec.  Returns 0 or -errno (nothing is left open on failure).
 */
int circuit_create_endpoints(const struct circuit_params *p, int side0[4], int side1[4]);

/*
 * The same circuit with five descriptors, as a creator that sends them holds
 * them: side s is handed [memfd, bell[s], ring[s], ring[1-s]].  The creator
 * closes bell[s] once side s has it (X_s must have no other holder) and may
 * keep the rest, ring[s] being side s's ringing end (its hang-up: s is
 * gone).  Returns 0 or -errno (nothing is left open on failure).
 */
struct circuit_made {
    int memfd;
    int bell[2]; /* X_s: side s's alone once handed over */
    int ring[2]; /* Y_s: side s rings itself with it, side 1-s rings s with it */
};
int circuit_make(const struct circuit_params *p, struct circuit_made *m);

/*
 * For a creator holding a duplicate of a side's self_bell: 0 once that side
 * is gone (its bell closed), 1 while it lives.  Drains what is queued, and
 * never blocks.
 */
int circuit_ring_end_alive(int fd);

/* The descriptors of one endpoint besides the memory. */
struct circuit_fds {
    int bell;      /* our doorbell's end we sleep on; only we hold it */
    int self_bell; /* our doorbell's other end: we ring ourselves with it */
    int peer_bell; /* the peer's doorbell's other end: we ring the peer */
};

/*
 * Map side `side` of the circuit in memfd, after checking the object against
 * params (seals, size, header).  The endpoint owns fds from now on (on
 * success only); memfd stays the caller's.
 * Returns 0 and *out, or -errno (-EPROTO: the object does not match params).
 */
int circuit_attach(int memfd, const struct circuit_fds *fds,
                   const struct circuit_params *p, int side, struct circuit **out);

/* Spin budget before sleeping, in nanoseconds (default: 50 us; 0: never spin). */
/* The default: 50 us with more than one CPU online, else 0. */
uint32_t circuit_default_spin(void);
void circuit_set_spin(struct circuit *c, uint32_t spin_ns);

/* Copying data path. */
ssize_t circuit_send(struct circuit *c, const void *buf, size_t len, int flags,
                     int64_t deadline);
ssize_t circuit_recv(struct circuit *c, void *buf, size_t len, int flags,
                     int64_t deadline);

/*
 * Zero-copy data path.  reserve waits for `need` bytes of free space (datagram:
 * room for a datagram of `need` bytes) and returns the writable span in *ptr
 * and its length; commit(n) publishes its first n bytes (datagram: as one
 * datagram).  peek waits for data and returns the readable span (datagram: the
 * next datagram's payload); consume(n) releases n bytes of it (datagram: the
 * whole datagram, n must equal its length).  A send or recv in between
 * cancels a reservation or peek.
 */
ssize_t circuit_reserve(struct circuit *c, size_t need, int flags,
                        int64_t deadline, void **ptr);
int circuit_commit(struct circuit *c, size_t n);
ssize_t circuit_peek(struct circuit *c, int flags, int64_t deadline, void **ptr);
int circuit_consume(struct circuit *c, size_t n);

/* Largest datagram this endpoint can send (its transmit ring less a header). */
size_t circuit_max_dgram(const struct circuit *c);

/* Readiness without waiting, for poll-style callers: CIRCUIT_READABLE etc. */
#define CIRCUIT_READABLE 1  /* data, end of data, or an error is waiting */
#define CIRCUIT_WRITABLE 2  /* a send would not wait */
#define CIRCUIT_HANGUP 4    /* peer closed, vanished or aborted */
int circuit_poll(struct circuit *c);

/*
 * As circuit_poll(), without asking the kernel whether the peer vanished
 * (no system call): for pollers that watch the peer's hang-up themselves
 * (peer_bell in an epoll set) and call circuit_poll() once it fires.
 */
int circuit_poll_known(struct circuit *c);

/*
 * Make our doorbell tell the truth for poll-style callers: after this, it is
 * readable if data or an end is waiting now, and it turns readable as soon
 * as either arrives.  Costs a syscall or two; callers that sleep inside the
 * library (blocking calls) do not need it.
 */
int circuit_arm_read(struct circuit *c);

/*
 * circuit_arm_read() for a caller that watches our doorbell edge-triggered
 * and the peer's hang-up itself (an epoll set of bell and peer_bell): no
 * system call while our need-wakeup flag is still up (no ring came since),
 * and a drain of the doorbell only now and then, so that its queue never
 * fills (a ring into a full queue makes no edge).  The doorbell may stay
 * readable with nothing to do: a level poller must use circuit_arm_read().
 */
int circuit_arm_edge(struct circuit *c);

int circuit_shutdown_write(struct circuit *c);
int circuit_abort(struct circuit *c);
/* End this side: mark CLOSED, wake the peer and local waiters, close the fds. */
int circuit_close(struct circuit *c);
/* Give up this endpoint without ending the circuit (it lives on in another
 * process that holds the same memory and fds): closes our fds only. */
int circuit_detach(struct circuit *c);
/* Unmap and free; closes the endpoint first unless it was closed or detached. */
void circuit_free(struct circuit *c);

/* Introspection. */
/* The descriptor poll-style callers watch; -1 once closed. */
int circuit_bell(const struct circuit *c);
int circuit_side(const struct circuit *c);
uint32_t circuit_kind(const struct circuit *c);
/* Base of the mirror-mapped transmit (dir = 0) or receive (dir = 1) area. */
void *circuit_area_base(const struct circuit *c, int dir);
uint64_t circuit_area_size(const struct circuit *c, int dir);
/* Bytes ever sent, ever received (from this side's own indices). */
uint64_t circuit_bytes_sent(const struct circuit *c);
uint64_t circuit_bytes_received(const struct circuit *c);

#endif
