/*
 * dgram.c - datagrams: each is one record, an 8-byte header (payload length)
 * followed by the payload, padded to 8 bytes.  Records are published whole,
 * never split, and thanks to the mirror mapping never broken at the wrap.
 * Callers (io.c) hold the direction's lock.
 */
#include <string.h>

#include "internal.h"

#define HDR ((uint64_t)sizeof(struct circuit_record))

static uint64_t record_size(uint64_t len)
{
    return HDR + ((len + CIRCUIT_RECORD_ALIGN - 1) & ~(uint64_t)(CIRCUIT_RECORD_ALIGN - 1));
}

size_t circuit_max_dgram(const struct circuit *c) { return (size_t)(c->tx.size - HDR); }

/* Wait for room for a record of `len` payload bytes; 0 when there is. */
static int wait_room(struct circuit *c, uint64_t len, int flags, int64_t deadline,
                     uint64_t *free)
{
    if (len > c->tx.size - HDR)
        return -EMSGSIZE;
    for (;;) {
        int err;
        if ((err = circuit_tx_end(c)) || (err = circuit_tx_free(c, free)))
            return err;
        if (*free >= record_size(len))
            return 0;
        if ((err = circuit_wait(c, WAIT_TX, record_size(len), flags, deadline)))
            return err;
    }
}

static void write_record_header(struct circuit_ring *r, uint64_t len)
{
    struct circuit_record h = {.len = (uint32_t)len, .reserved = 0};
    memcpy(r->data + (r->local & r->mask), &h, HDR);
}

ssize_t dgram_send(struct circuit *c, const uint8_t *buf, size_t len, int flags,
                   int64_t deadline)
{
    struct circuit_ring *r = &c->tx;
    uint64_t free;
    int err = wait_room(c, len, flags, deadline, &free);
    if (err)
        return err;
    write_record_header(r, len);
    if (len) /* an empty datagram may come from a NULL buffer */
        memcpy(r->data + ((r->local + HDR) & r->mask), buf, len);
    circuit_publish(c, record_size(len));
    return (ssize_t)len;
}

/*
 * Wait for the next record and check its header: its length is read once,
 * then it must fit both the ring and what was published.
 */
static ssize_t next_record(struct circuit *c, int flags, int64_t deadline)
{
    struct circuit_ring *r = &c->rx;
    for (;;) {
        uint64_t avail;
        int err = circuit_rx_settled(c, &avail);
        if (err)
            return err;
        if (avail) {
            struct circuit_record h;
            memcpy(&h, r->data + (r->local & r->mask), HDR);
            if (avail < HDR || h.reserved || h.len > r->size - HDR ||
                record_size(h.len) > avail)
                return circuit_violation(c);
            return h.len;
        }
        if ((err = circuit_wait(c, WAIT_RX, 1, flags, deadline)))
            return err;
    }
}

/* Returns the datagram's full length; only min(len, full) bytes are copied. */
ssize_t dgram_recv(struct circuit *c, uint8_t *buf, size_t len, int flags,
                   int64_t deadline)
{
    struct circuit_ring *r = &c->rx;
    ssize_t full = next_record(c, flags, deadline);
    if (full < 0)
        return full;
    size_t n = (size_t)full < len ? (size_t)full : len;
    if (n) /* a NULL buffer of length 0 just discards the datagram */
        memcpy(buf, r->data + ((r->local + HDR) & r->mask), n);
    circuit_release(c, record_size((uint64_t)full));
    return full;
}

ssize_t dgram_reserve(struct circuit *c, size_t need, int flags, int64_t deadline,
                      void **ptr)
{
    struct circuit_ring *r = &c->tx;
    uint64_t free;
    int err = wait_room(c, need, flags, deadline, &free);
    if (err)
        return err;
    /* pending counts the header too: with room for just an empty datagram
     * (free == HDR) the reservation must still be told from none (0). */
    r->pending = free;
    *ptr = r->data + ((r->local + HDR) & r->mask);
    return (ssize_t)(free - HDR);
}

int dgram_commit(struct circuit *c, size_t n)
{
    struct circuit_ring *r = &c->tx;
    if (!r->pending || n > r->pending - HDR)
        return -EINVAL;
    int err = circuit_tx_end(c);
    r->pending = 0;
    if (err)
        return err;
    write_record_header(r, n);
    circuit_publish(c, record_size(n));
    return 0;
}

ssize_t dgram_peek(struct circuit *c, int flags, int64_t deadline, void **ptr)
{
    struct circuit_ring *r = &c->rx;
    ssize_t len = next_record(c, flags, deadline);
    if (len < 0)
        return len;
    r->pending = record_size((uint64_t)len);
    r->pending_len = (uint64_t)len;
    *ptr = r->data + ((r->local + HDR) & r->mask);
    return len;
}

int dgram_consume(struct circuit *c, size_t n)
{
    struct circuit_ring *r = &c->rx;
    if (c->broken)
        return -ECONNRESET; /* a broken circuit's memory is never written again */
    if (!r->pending || n != r->pending_len)
        return -EINVAL;
    circuit_release(c, r->pending);
    r->pending = 0;
    return 0;
}
