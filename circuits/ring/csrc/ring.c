/*
 * ring.c - index arithmetic of one single-producer/single-consumer ring.
 *
 * Indices are free-running 64-bit byte counters.  The consumer may trust only
 * its own cons; the producer only its own prod.  The other index is read from
 * shared memory, checked against what is possible, and must never go back:
 *
 *   consumer:  seen <= prod <= cons + size      (else the peer lied)
 *   producer:  seen <= cons <= prod             (else the peer lied)
 *
 * A lie aborts the circuit (ECONNRESET); it can never make us touch memory
 * outside the mapping, because every offset is masked into [0, size) and a
 * span is at most size long, which the mirror mapping keeps contiguous.
 */
#include "internal.h"

/* Datagram rings move whole 8-byte-aligned records only. */
static bool misaligned(const struct circuit *c, uint64_t v)
{
    return c->kind == CIRCUIT_DGRAM && (v & (CIRCUIT_RECORD_ALIGN - 1));
}

/* Readable bytes without side effects; false if the peer's index is a lie. */
bool circuit_rx_peek_avail(const struct circuit *c, uint64_t *avail)
{
    const struct circuit_ring *r = &c->rx;
    uint64_t prod = load_acquire(&r->ctrl->prod);
    *avail = prod - r->local;
    return prod - r->seen <= r->local + r->size - r->seen && !misaligned(c, *avail);
}

/* Free bytes without side effects; false if the peer's index is a lie. */
bool circuit_tx_peek_free(const struct circuit *c, uint64_t *free)
{
    const struct circuit_ring *r = &c->tx;
    uint64_t cons = load_acquire(&r->ctrl->cons);
    *free = r->size - (r->local - cons);
    return cons - r->seen <= r->local - r->seen && !misaligned(c, r->local - cons);
}

int circuit_rx_avail(struct circuit *c, uint64_t *avail)
{
    if (c->broken)
        return -ECONNRESET;
    if (!circuit_rx_peek_avail(c, avail))
        return circuit_violation(c);
    c->rx.seen = c->rx.local + *avail;
    return 0;
}

int circuit_tx_free(struct circuit *c, uint64_t *free)
{
    if (c->broken)
        return -ECONNRESET;
    if (!circuit_tx_peek_free(c, free))
        return circuit_violation(c);
    c->tx.seen = c->tx.local - (c->tx.size - *free);
    return 0;
}

/*
 * Readable bytes; when there are none, why none will come (0: more may).
 * The peer publishes its data before its state, so after reading an ending
 * state we look at the ring once more before reporting the end.
 */
int circuit_rx_settled(struct circuit *c, uint64_t *avail)
{
    int err = circuit_rx_avail(c, avail);
    if (err || *avail)
        return err;
    int end = circuit_rx_end(c);
    if (!end)
        return 0;
    err = circuit_rx_avail(c, avail);
    if (err || *avail)
        return err;
    return end;
}

/* Publish n more bytes; wake the consumer only if it said it sleeps. */
void circuit_publish(struct circuit *c, uint64_t n)
{
    struct circuit_ring *r = &c->tx;
    r->local += n;
    store_release(&r->ctrl->prod, r->local);
    full_fence(); /* order the prod store before the flag load: one per call */
    if (load_relaxed(&r->ctrl->cons_wait) &&
        __atomic_exchange_n(&r->ctrl->cons_wait, 0, __ATOMIC_ACQ_REL))
        circuit_ring(c, c->peer_bell);
}

/* Release n consumed bytes; wake the producer only if it said it sleeps. */
void circuit_release(struct circuit *c, uint64_t n)
{
    struct circuit_ring *r = &c->rx;
    r->local += n;
    store_release(&r->ctrl->cons, r->local);
    full_fence();
    if (load_relaxed(&r->ctrl->prod_wait) &&
        __atomic_exchange_n(&r->ctrl->prod_wait, 0, __ATOMIC_ACQ_REL))
        circuit_ring(c, c->peer_bell);
}
