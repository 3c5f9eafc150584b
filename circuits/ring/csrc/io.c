/*
 * io.c - the public data-path calls: take the direction's lock, cancel any
 * zero-copy span that a copying call invalidates, dispatch on the kind.
 */
#include "internal.h"

#define IS_DGRAM(c) ((c)->kind == CIRCUIT_DGRAM)

/* Lock a direction of an open endpoint; 0 or -errno. */
static int enter(struct circuit *c, struct circuit_ring *r, int flags, int64_t deadline)
{
    if (__atomic_load_n(&c->closed, __ATOMIC_ACQUIRE))
        return -EBADF;
    return circuit_lock(&r->lock, flags, deadline);
}

static ssize_t leave(struct circuit_ring *r, ssize_t rc)
{
    pthread_mutex_unlock(&r->lock);
    return rc;
}

ssize_t circuit_send(struct circuit *c, const void *buf, size_t len, int flags,
                     int64_t deadline)
{
    int err = enter(c, &c->tx, flags, deadline);
    if (err)
        return err;
    c->tx.pending = 0;
    ssize_t rc = IS_DGRAM(c) ? dgram_send(c, buf, len, flags, deadline)
                             : stream_send(c, buf, len, flags, deadline);
    if (rc >= 0)
        c->tx_blocked = false;
    return leave(&c->tx, rc);
}

ssize_t circuit_recv(struct circuit *c, void *buf, size_t len, int flags,
                     int64_t deadline)
{
    int err = enter(c, &c->rx, flags, deadline);
    if (err)
        return err;
    c->rx.pending = 0;
    if (!len && !IS_DGRAM(c))
        return leave(&c->rx, 0);
    return leave(&c->rx, IS_DGRAM(c) ? dgram_recv(c, buf, len, flags, deadline)
                                     : stream_recv(c, buf, len, flags, deadline));
}

ssize_t circuit_reserve(struct circuit *c, size_t need, int flags, int64_t deadline,
                        void **ptr)
{
    int err = enter(c, &c->tx, flags, deadline);
    if (err)
        return err;
    c->tx.pending = 0;
    return leave(&c->tx, IS_DGRAM(c) ? dgram_reserve(c, need, flags, deadline, ptr)
                                     : stream_reserve(c, need, flags, deadline, ptr));
}

int circuit_commit(struct circuit *c, size_t n)
{
    int err = enter(c, &c->tx, 0, CIRCUIT_FOREVER);
    if (err)
        return err;
    return (int)leave(&c->tx, IS_DGRAM(c) ? dgram_commit(c, n) : stream_commit(c, n));
}

ssize_t circuit_peek(struct circuit *c, int flags, int64_t deadline, void **ptr)
{
    int err = enter(c, &c->rx, flags, deadline);
    if (err)
        return err;
    c->rx.pending = 0;
    return leave(&c->rx, IS_DGRAM(c) ? dgram_peek(c, flags, deadline, ptr)
                                     : stream_peek(c, flags, deadline, ptr));
}

int circuit_consume(struct circuit *c, size_t n)
{
    int err = enter(c, &c->rx, 0, CIRCUIT_FOREVER);
    if (err)
        return err;
    return (int)leave(&c->rx, IS_DGRAM(c) ? dgram_consume(c, n) : stream_consume(c, n));
}

int circuit_arm_read(struct circuit *c)
{
    if (__atomic_load_n(&c->closed, __ATOMIC_ACQUIRE))
        return -EBADF;
    /* Both locks: the rings must hold still while we look at them.  A busy
     * lock means a thread is inside a call and will arm again on its way out. */
    if (pthread_mutex_trylock(&c->rx.lock))
        return 0;
    if (pthread_mutex_trylock(&c->tx.lock)) {
        pthread_mutex_unlock(&c->rx.lock);
        return 0;
    }
    int rc = circuit_arm(c);
    pthread_mutex_unlock(&c->tx.lock);
    pthread_mutex_unlock(&c->rx.lock);
    return rc;
}
