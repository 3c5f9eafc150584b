/*
 * state.c - side states, doorbells, the link, and how a conversation ends.
 *
 * Each side publishes its own state in the header; the peer's state is read,
 * checked and latched (it can only move forward in our eyes).  A doorbell is
 * an eventfd: ringing adds 1, draining reads the count back to 0.  The link
 * is a socket pair end that carries nothing; its hang-up means the peer is
 * gone, whatever its state says.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#include "internal.h"

uint32_t circuit_peer_state(struct circuit *c)
{
    uint32_t s = load_acquire(&c->hdr->side[1 - c->side].state);
    if (s > CIRCUIT_ABORTED) {
        circuit_violation(c);
        s = CIRCUIT_ABORTED;
    }
    if (s > c->peer_state)
        c->peer_state = s;
    return c->peer_state;
}

void circuit_ring(struct circuit *c, int bell)
{
    (void)c;
    uint64_t one = 1;
    /* EAGAIN only if the count is near 2^64: it is readable anyway. */
    if (bell >= 0 && write(bell, &one, sizeof(one)) < 0)
        return;
}

void circuit_drain_bell(struct circuit *c)
{
    uint64_t count;
    if (read(c->bell, &count, sizeof(count)) < 0)
        return; /* EAGAIN: nothing rang */
}

void circuit_check_link(struct circuit *c)
{
    struct pollfd p = {.fd = c->link, .events = 0};
    if (c->link >= 0 && poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR)))
        c->peer_gone = true;
}

void circuit_set_my_state(struct circuit *c, uint32_t state)
{
    if (state <= c->my_state)
        return;
    c->my_state = state;
    store_release(&c->hdr->side[c->side].state, state);
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
    if (c->my_state >= CIRCUIT_WRITE_SHUT)
        return -EPIPE;
    uint32_t peer = circuit_peer_state(c);
    if (peer == CIRCUIT_ABORTED || (c->peer_gone && peer < CIRCUIT_CLOSED))
        return -ECONNRESET;
    if (peer == CIRCUIT_CLOSED || c->peer_gone)
        return -EPIPE;
    return 0;
}

int circuit_shutdown_write(struct circuit *c)
{
    if (c->closed)
        return -EBADF;
    circuit_set_my_state(c, CIRCUIT_WRITE_SHUT);
    return 0;
}

int circuit_abort(struct circuit *c)
{
    if (c->closed)
        return -EBADF;
    circuit_set_my_state(c, CIRCUIT_ABORTED);
    return 0;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* Close our fds; wake our own sleeping threads first, they will see EBADF. */
static void end_endpoint(struct circuit *c)
{
    __atomic_store_n(&c->closed, true, __ATOMIC_RELEASE);
    circuit_ring(c, c->bell);
    close_fd(&c->link);
    close_fd(&c->peer_bell);
    close_fd(&c->bell);
}

int circuit_close(struct circuit *c)
{
    if (c->closed)
        return -EBADF;
    circuit_set_my_state(c, CIRCUIT_CLOSED);
    end_endpoint(c);
    return 0;
}

int circuit_detach(struct circuit *c)
{
    if (c->closed)
        return -EBADF;
    end_endpoint(c);
    return 0;
}

/* What a poller would be told now; lock-free, no side effects, no syscall. */
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

int circuit_poll(struct circuit *c)
{
    if (__atomic_load_n(&c->closed, __ATOMIC_ACQUIRE))
        return CIRCUIT_READABLE | CIRCUIT_WRITABLE | CIRCUIT_HANGUP;
    circuit_check_link(c);
    return circuit_readiness(c);
}

/*
 * After draining our doorbell, ring it again if a poller of it has work:
 * data or an end to receive, or room that a blocked sender waits for.  This
 * keeps the rule that fileno() polling relies on: while there is work, our
 * doorbell's count is not zero.
 */
void circuit_restore_bell(struct circuit *c)
{
    int mask = circuit_readiness(c);
    if ((mask & CIRCUIT_READABLE) || (c->tx_blocked && (mask & CIRCUIT_WRITABLE)))
        circuit_ring(c, c->bell);
}
