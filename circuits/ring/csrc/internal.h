/*
 * internal.h - the private side of an endpoint, shared by the ring sources.
 *
 * Rule of this file: a value read from shared memory is loaded once into a
 * local variable, checked, and only then used.  Fields under `local` are
 * this process's own truth and are never read back from shared memory.
 */
#ifndef CIRCUITS_INTERNAL_H
#define CIRCUITS_INTERNAL_H

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "circuit.h"

#define load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define full_fence() __atomic_thread_fence(__ATOMIC_SEQ_CST)

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

/* One direction as this endpoint sees it. */
struct circuit_ring {
    struct circuit_dir_ctrl *ctrl; /* shared */
    uint8_t *data;                 /* mirror mapped: 2 * size bytes */
    uint64_t size, mask;
    uint64_t local;    /* my index: prod when I produce, cons when I consume */
    uint64_t seen;     /* the peer's index as last validated; it only grows */
    uint64_t pending;  /* reserved (tx) or peeked (rx) bytes, 0 if none */
    uint64_t pending_len; /* datagram: payload length of the peeked record */
    pthread_mutex_t lock;
};

struct circuit {
    int side;
    uint32_t kind;
    int bell, self_bell, peer_bell; /* doorbells (bell.c); -1 once released */
    void *map;             /* the whole object, data areas mirrored (map.c) */
    uint64_t map_size;     /* bytes of address space map spans */
    struct circuit_header *hdr;
    struct circuit_ctrl *ctrl;
    struct circuit_ring tx, rx;
    uint32_t spin_ns;
    /* local truth */
    uint32_t my_state;     /* CIRCUIT_OPEN ... as last written by us */
    uint32_t peer_state;   /* highest valid state seen from the peer */
    bool peer_gone;        /* the peer's doorbell is gone: it left or died */
    bool broken;           /* the peer broke the format: circuit aborted */
    bool closed;           /* circuit_close was called */
    bool fds_released;     /* the doorbells are closed (state.c) */
    bool shutting;         /* writing is ending: senders turn away (state.c) */
    uint64_t tx_need;      /* room a refused non-blocking send waits for, 0: none */
    uint64_t tx_wait;      /* room a sender asleep on the next ring waits for (atomic) */
    int waiters;           /* threads sleeping on the doorbell (atomic) */
    uint32_t edge_raises;  /* circuit_arm_edge's raises since it last drained (atomic) */
    int inflight;          /* calls inside the endpoint: fds stay open (atomic) */
    pthread_mutex_t bell_lock;  /* entering the sleep and draining (wait.c) */
    pthread_mutex_t state_lock; /* moving my_state forward (state.c) */
};

/* bell.c */
void circuit_ring(struct circuit *c, int bell);
void circuit_drain_bell(struct circuit *c);
void circuit_check_peer(struct circuit *c);
bool circuit_restore_bell(struct circuit *c);

/* state.c */
uint32_t circuit_peer_state(struct circuit *c);
int circuit_readiness(struct circuit *c);
void circuit_release_fds(struct circuit *c);
int circuit_violation(struct circuit *c);
void circuit_set_my_state(struct circuit *c, uint32_t state);
int circuit_rx_end(struct circuit *c);
int circuit_tx_end(struct circuit *c);

/* wait.c */
enum circuit_wait_for { WAIT_RX, WAIT_TX };
int64_t circuit_now(void);
int circuit_wait(struct circuit *c, enum circuit_wait_for what, uint64_t need,
                 int flags, int64_t deadline);
int circuit_lock(pthread_mutex_t *m, int flags, int64_t deadline);

/* io.c: every call that may touch our fds is inside enter/exit */
int circuit_enter(struct circuit *c);
void circuit_exit(struct circuit *c);
int circuit_arm(struct circuit *c);

/* ring.c: index arithmetic, validated against the peer */
bool circuit_rx_peek_avail(const struct circuit *c, uint64_t *avail);
bool circuit_tx_peek_free(const struct circuit *c, uint64_t *free);
int circuit_rx_avail(struct circuit *c, uint64_t *avail);
int circuit_tx_free(struct circuit *c, uint64_t *free);
void circuit_publish(struct circuit *c, uint64_t n);
void circuit_release(struct circuit *c, uint64_t n);
int circuit_rx_settled(struct circuit *c, uint64_t *avail);

/* stream.c and dgram.c: the two kinds behind the public calls (io.c) */
ssize_t stream_send(struct circuit *c, const uint8_t *buf, size_t len, int flags, int64_t deadline);
ssize_t stream_recv(struct circuit *c, uint8_t *buf, size_t len, int flags, int64_t deadline);
ssize_t stream_reserve(struct circuit *c, size_t need, int flags, int64_t deadline, void **ptr);
int stream_commit(struct circuit *c, size_t n);
ssize_t stream_peek(struct circuit *c, int flags, int64_t deadline, void **ptr);
int stream_consume(struct circuit *c, size_t n);
ssize_t dgram_send(struct circuit *c, const uint8_t *buf, size_t len, int flags, int64_t deadline);
ssize_t dgram_recv(struct circuit *c, uint8_t *buf, size_t len, int flags, int64_t deadline);
ssize_t dgram_reserve(struct circuit *c, size_t need, int flags, int64_t deadline, void **ptr);
int dgram_commit(struct circuit *c, size_t n);
ssize_t dgram_peek(struct circuit *c, int flags, int64_t deadline, void **ptr);
int dgram_consume(struct circuit *c, size_t n);

#endif
