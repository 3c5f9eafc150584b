/*
 * stream.c - byte streams: copying send and receive, zero-copy reserve/commit
 * and peek/consume.  Callers (io.c) hold the direction's lock.
 */
#include <string.h>

#include "internal.h"

static size_t min_size(uint64_t a, size_t b) { return a < b ? (size_t)a : b; }

ssize_t stream_send(struct circuit *c, const uint8_t *buf, size_t len, int flags,
                    int64_t deadline)
{
    struct circuit_ring *r = &c->tx;
    size_t done = 0;
    int err = 0;
    while (done < len) {
        uint64_t free;
        if ((err = circuit_tx_end(c)) || (err = circuit_tx_free(c, &free)))
            break;
        size_t n = min_size(free, len - done);
        if (n) {
            memcpy(r->data + (r->local & r->mask), buf + done, n);
            circuit_publish(c, n);
            done += n;
            if (!(flags & CIRCUIT_ALL))
                break;
        } else if ((err = circuit_wait(c, WAIT_TX, 1, flags, deadline))) {
            break;
        }
    }
    return done ? (ssize_t)done : err;
}

ssize_t stream_recv(struct circuit *c, uint8_t *buf, size_t len, int flags,
                    int64_t deadline)
{
    struct circuit_ring *r = &c->rx;
    size_t done = 0;
    int err = 0;
    while (done < len) {
        uint64_t avail;
        if ((err = circuit_rx_settled(c, &avail)))
            break;
        size_t n = min_size(avail, len - done);
        if (n) {
            memcpy(buf + done, r->data + (r->local & r->mask), n);
            circuit_release(c, n);
            done += n;
            if (!(flags & CIRCUIT_ALL))
                break;
        } else if ((err = circuit_wait(c, WAIT_RX, 1, flags, deadline))) {
            break;
        }
    }
    return done ? (ssize_t)done : err;
}

ssize_t stream_reserve(struct circuit *c, size_t need, int flags, int64_t deadline,
                       void **ptr)
{
    struct circuit_ring *r = &c->tx;
    if (need > r->size)
        return -EINVAL;
    for (;;) {
        uint64_t free;
        int err;
        if ((err = circuit_tx_end(c)) || (err = circuit_tx_free(c, &free)))
            return err;
        if (free >= need && free > 0) {
            r->pending = free;
            *ptr = r->data + (r->local & r->mask);
            return (ssize_t)free;
        }
        if ((err = circuit_wait(c, WAIT_TX, need ? need : 1, flags, deadline)))
            return err;
    }
}

int stream_commit(struct circuit *c, size_t n)
{
    struct circuit_ring *r = &c->tx;
    if (n > r->pending)
        return -EINVAL;
    int err = circuit_tx_end(c);
    r->pending = 0;
    if (err)
        return err;
    if (n)
        circuit_publish(c, n);
    return 0;
}

ssize_t stream_peek(struct circuit *c, int flags, int64_t deadline, void **ptr)
{
    struct circuit_ring *r = &c->rx;
    for (;;) {
        uint64_t avail;
        int err = circuit_rx_settled(c, &avail);
        if (err)
            return err;
        if (avail) {
            r->pending = avail;
            *ptr = r->data + (r->local & r->mask);
            return (ssize_t)avail;
        }
        if ((err = circuit_wait(c, WAIT_RX, 1, flags, deadline)))
            return err;
    }
}

int stream_consume(struct circuit *c, size_t n)
{
    struct circuit_ring *r = &c->rx;
    if (c->broken)
        return -ECONNRESET; /* a broken circuit's memory is never written again */
    if (n > r->pending)
        return -EINVAL;
    r->pending -= n;
    if (n)
        circuit_release(c, n);
    return 0;
}
