/*
 * state.c - side states, and how a conversation ends.
 *
 * Each side publishes its own state in the header; the peer's state is read,
 * checked and latched (it can only move forward in our eyes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <unistd.h>

#include "internal.h"

uint32_t circuit_peer_state(struct circuit *c)
{
    uint32_t s = load_acquire(&c->hdr->side[1 - c->side].state);
    if (s > CIRCUIT_ABORTED) {
        circuit_violation(c);
        s = CIRCUIT_ABORTED;
    }
    /* Latch the highest: threads racing here may only move it forward. */
    uint32_t seen = __atomic_load_n(&c->peer_state, __ATOMIC_ACQUIRE);
    while (s > seen &&
           !__atomic_compare_exchange_n(&c->peer_state, &seen, s, false,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    return s > seen ? s : seen;
}

/* Move our state forward (never back, whichever thread wins) and tell the peer. */
void circuit_set_my_state(struct circuit *c, uint32_t state)
{
    pthread_mutex_lock(&c->state_lock);
    bool forward = state > c->my_state;
    if (forward) {
        c->my_state = state;
        /* Never lower the stored value: the trusted party may have raised it
         * to ABORTED to revoke the circuit (docs/circuit-format.md, 6). */
        uint32_t *shared = &c->hdr->side[c->side].state;
        uint32_t seen = load_acquire(shared);
        while (seen < state && !__atomic_compare_exchange_n(shared, &seen, state, false,
                                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            ;
    }
    pthread_mutex_unlock(&c->state_lock);
    if (!forward)
        return;
    full_fence();
    circuit_ring(c, c->peer_bell);
}

/* The peer broke the format: abort the circuit, never touch it again. */
int circuit_violation(struct circuit *c)
{
    c->broken = true;
    circuit_set_my_state(c, CIRCUIT_ABORTED);
    return -ECONNRESET;
}

/*
 * Why nothing more can be received, once the ring is empty: 0 if more may
 * come, else the error to report.  A peer that vanished without shutting down
 * is a reset; one that shut down writing first is a clean end of data.
 */
int circuit_rx_end(struct circuit *c)
{
    if (c->closed)
        return -EBADF;
    if (c->broken || c->my_state == CIRCUIT_ABORTED)
        return -ECONNRESET;
    uint32_t peer = circuit_peer_state(c);
    if (peer == CIRCUIT_ABORTED)
        return -ECONNRESET;
    if (peer >= CIRCUIT_WRITE_SHUT)
        return -ESHUTDOWN;
    if (c->peer_gone)
        return -ECONNRESET;
    return 0;
}

/* Why nothing more can be sent: 0 if sending is possible. */
int circuit_tx_end(struct circuit *c)
{
    if (c->closed)
        return -EBADF;
    if (c->broken || c->my_state == CIRCUIT_ABORTED)
        return -ECONNRESET;
    if (c->my_state >= CIRCUIT_WRITE_SHUT || __atomic_load_n(&c->shutting, __ATOMIC_ACQUIRE))
        return -EPIPE;
    uint32_t peer = circuit_peer_state(c);
    if (peer == CIRCUIT_ABORTED || (c->peer_gone && peer < CIRCUIT_CLOSED))
        return -ECONNRESET;
    if (peer == CIRCUIT_CLOSED || c->peer_gone)
        return -EPIPE;
    return 0;
}

/*
 * End our writing (WRITE_SHUT or CLOSED) only once no send of ours is
 * half-way: a sender past its checks would otherwise publish after our end,
 * and the peer would read data after its end of data.  `shutting` turns a
 * sender away (EPIPE), the ring wakes one asleep on a full ring, and the
 * transmit lock waits for one in the middle of a publish.
 */
static void end_writing(struct circuit *c, uint32_t state)
{
    __atomic_store_n(&c->shutting, true, __ATOMIC_RELEASE);
    circuit_ring(c, c->self_bell);
    pthread_mutex_lock(&c->tx.lock);
    circuit_set_my_state(c, state);
    pthread_mutex_unlock(&c->tx.lock);
}

int circuit_shutdown_write(struct circuit *c)
{
    if (circuit_enter(c))
        return -EBADF;
    end_writing(c, CIRCUIT_WRITE_SHUT);
    circuit_exit(c);
    return 0;
}

/* A reset needs no care for senders: it promises the peer nothing about data. */
int circuit_abort(struct circuit *c)
{
    if (circuit_enter(c))
        return -EBADF;
    circuit_set_my_state(c, CIRCUIT_ABORTED);
    circuit_exit(c);
    return 0;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* Close our fds: only once no call is inside (see circuit_exit). */
void circuit_release_fds(struct circuit *c)
{
    if (__atomic_exchange_n(&c->fds_released, true, __ATOMIC_ACQ_REL))
        return;
    close_fd(&c->peer_bell);
    close_fd(&c->self_bell);
    close_fd(&c->bell);
}

/* Mark closed once; wake our own sleepers, they will see EBADF on their way out. */
static int end_endpoint(struct circuit *c, uint32_t state)
{
    if (circuit_enter(c))
        return -EBADF;
    bool was = __atomic_exchange_n(&c->closed, true, __ATOMIC_ACQ_REL);
    if (!was) {
        circuit_ring(c, c->self_bell); /* our sleepers wake and leave with EBADF */
        if (state)
            end_writing(c, state);
    }
    circuit_exit(c);
    return was ? -EBADF : 0;
}

int circuit_close(struct circuit *c) { return end_endpoint(c, CIRCUIT_CLOSED); }
int circuit_detach(struct circuit *c) { return end_endpoint(c, 0); }

/* What a poller would be told now; lock-free and no syscall (a lie in the
 * peer's state is the one thing that acts: it aborts the circuit). */
int circuit_readiness(struct circuit *c)
{
    int mask = 0;
    uint64_t n;
    if (!circuit_rx_peek_avail(c, &n) || n > 0 || circuit_rx_end(c))
        mask |= CIRCUIT_READABLE;
    uint64_t need = c->kind == CIRCUIT_DGRAM ? 2 * sizeof(struct circuit_record) : 1;
    if (!circuit_tx_peek_free(c, &n) || n >= need || circuit_tx_end(c))
        mask |= CIRCUIT_WRITABLE;
    if (c->peer_gone || c->peer_state >= CIRCUIT_CLOSED || c->broken)
        mask |= CIRCUIT_HANGUP;
    return mask;
}

/*
 * Counting the call in (two atomic read-modify-writes, a good part of an
 * epoll loop's look at each of its circuits) only keeps our descriptors
 * open, and readiness touches one only to abort the circuit when the peer's
 * state is a lie: a valid state needs memory alone, mapped until circuit_free.
 */
int circuit_poll_known(struct circuit *c)
{
    bool valid = load_acquire(&c->hdr->side[1 - c->side].state) <= CIRCUIT_ABORTED;
    if (valid && !__atomic_load_n(&c->closed, __ATOMIC_ACQUIRE))
        return circuit_readiness(c);
    if (circuit_enter(c))
        return CIRCUIT_READABLE | CIRCUIT_WRITABLE | CIRCUIT_HANGUP;
    int mask = circuit_readiness(c);
    circuit_exit(c);
    return mask;
}

int circuit_poll(struct circuit *c)
{
    if (circuit_enter(c))
        return CIRCUIT_READABLE | CIRCUIT_WRITABLE | CIRCUIT_HANGUP;
    circuit_check_peer(c);
    int mask = circuit_readiness(c);
    circuit_exit(c);
    return mask;
}
