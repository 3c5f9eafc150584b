/*
 * io.c - the public data-path calls: take the direction's lock, cancel any
 * zero-copy span that a copying call invalidates, dispatch on the kind.
 */
#include "internal.h"

#define IS_DGRAM(c) ((c)->kind == CIRCUIT_DGRAM)

/*
 * Count a call in; -EBADF if the endpoint is closed.  While any call is in,
 * our descriptors stay open (close only marks the endpoint closed): a call
 * never sleeps on, or rings, a descriptor number that was reused meanwhile.
 */
int circuit_enter(struct circuit *c)
{
    __atomic_add_fetch(&c->inflight, 1, __ATOMIC_ACQ_REL);
    if (!__atomic_load_n(&c->closed, __ATOMIC_ACQUIRE))
        return 0;
    circuit_exit(c);
    return -EBADF;
}

/* Count a call out; the last one out of a closed endpoint closes the fds. */
void circuit_exit(struct circuit *c)
{
    if (__atomic_sub_fetch(&c->inflight, 1, __ATOMIC_ACQ_REL) == 0 &&
        __atomic_load_n(&c->closed, __ATOMIC_ACQUIRE))
        circuit_release_fds(c);
}

/* Count in and lock a direction; 0 or -errno. */
static int enter(struct circuit *c, struct circuit_ring *r, int flags, int64_t deadline)
{
    int err = circuit_enter(c);
    if (err)
        return err;
    err = circuit_lock(&r->lock, flags, deadline);
    if (err)
        circuit_exit(c);
    return err;
}

static ssize_t leave(struct circuit *c, struct circuit_ring *r, ssize_t rc)
{
    pthread_mutex_unlock(&r->lock);
    circuit_exit(c);
    return rc;
}

ssize_t circuit_send(struct circuit *c, const void *buf, size_t len, int flags,
                     int64_t deadline)
{
    int err = enter(c, &c->tx, flags, deadline);
    if (err)
        return err;
    c->tx.pending = 0;
    c->tx_need = 0; /* the room a refused send waited for is this call's business now */
    ssize_t rc = IS_DGRAM(c) ? dgram_send(c, buf, len, flags, deadline)
                             : stream_send(c, buf, len, flags, deadline);
    return leave(c, &c->tx, rc);
}

ssize_t circuit_recv(struct circuit *c, void *buf, size_t len, int flags,
                     int64_t deadline)
{
    int err = enter(c, &c->rx, flags, deadline);
    if (err)
        return err;
    c->rx.pending = 0;
    if (!len && !IS_DGRAM(c))
        return leave(c, &c->rx, 0);
    return leave(c, &c->rx, IS_DGRAM(c) ? dgram_recv(c, buf, len, flags, deadline)
                                     : stream_recv(c, buf, len, flags, deadline));
}

ssize_t circuit_reserve(struct circuit *c, size_t need, int flags, int64_t deadline,
                        void **ptr)
{
    int err = enter(c, &c->tx, flags, deadline);
    if (err)
        return err;
    c->tx.pending = 0;
    c->tx_need = 0;
    return leave(c, &c->tx, IS_DGRAM(c) ? dgram_reserve(c, need, flags, deadline, ptr)
                                     : stream_reserve(c, need, flags, deadline, ptr));
}

int circuit_commit(struct circuit *c, size_t n)
{
    int err = enter(c, &c->tx, 0, CIRCUIT_FOREVER);
    if (err)
        return err;
    return (int)leave(c, &c->tx, IS_DGRAM(c) ? dgram_commit(c, n) : stream_commit(c, n));
}

ssize_t circuit_peek(struct circuit *c, int flags, int64_t deadline, void **ptr)
{
    int err = enter(c, &c->rx, flags, deadline);
    if (err)
        return err;
    c->rx.pending = 0;
    return leave(c, &c->rx, IS_DGRAM(c) ? dgram_peek(c, flags, deadline, ptr)
                                     : stream_peek(c, flags, deadline, ptr));
}

int circuit_consume(struct circuit *c, size_t n)
{
    int err = enter(c, &c->rx, 0, CIRCUIT_FOREVER);
    if (err)
        return err;
    return (int)leave(c, &c->rx, IS_DGRAM(c) ? dgram_consume(c, n) : stream_consume(c, n));
}

int circuit_arm_read(struct circuit *c)
{
    int err = circuit_enter(c);
    if (err)
        return err;
    /* Both locks: the rings must hold still while we look at them.  A busy
     * lock means a thread is inside a call: it arms on its way to sleep. */
    int rc = 0;
    if (pthread_mutex_trylock(&c->rx.lock) == 0) {
        if (pthread_mutex_trylock(&c->tx.lock) == 0) {
            rc = circuit_arm(c);
            pthread_mutex_unlock(&c->tx.lock);
        }
        pthread_mutex_unlock(&c->rx.lock);
    }
    circuit_exit(c);
    return rc;
}
