/*
 * fdtable.c - which program descriptors are circuit sockets.
 *
 * A two-level table indexed by descriptor number holds a pointer to each
 * circuit socket's state (struct cp_sock).  The fast path, taken by every
 * wrapped call on every descriptor, is one lock-free load: most descriptors
 * (files, pipes, Unix sockets) have no entry and the call passes through.
 *
 * Entries are reference counted: the table holds one per descriptor (dup
 * makes two descriptors share one socket, as they share one kernel file),
 * and each call holds one while it is inside.  The socket is freed, and its
 * circuit closed, when the last descriptor is closed and the last call has
 * left: like the kernel, a close() does not pull a socket from under a
 * thread blocked on it.  Taking a reference races with removal, so the slot
 * is read under a read lock of one of 64 stripes (by descriptor number):
 * calls on different descriptors rarely share a stripe, and readers never
 * block each other.
 *
 * A UDP socket's circuit can be replaced under a call that still uses the
 * old one (udp.c retires it), so its calls in flight are counted apart
 * (calls): references also stand for descriptors and epoll registrations,
 * which hold no circuit.  cp_fd_get counts a call in, cp_sock_put out.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "preload.h"

#define CHUNK_BITS 10
#define CHUNK_SIZE (1 << CHUNK_BITS)
#define CHUNKS 1024 /* descriptors below 2^20 can be circuit sockets */
#define STRIPES 64

static struct cp_sock **chunks[CHUNKS];
static pthread_rwlock_t stripes[STRIPES] = {[0 ... STRIPES - 1] = PTHREAD_RWLOCK_INITIALIZER};

static pthread_rwlock_t *stripe(int fd) { return &stripes[fd % STRIPES]; }

/* The slot of fd, or NULL if its chunk was never made (or fd is out of range). */
static struct cp_sock **slot(int fd)
{
    if (fd < 0 || fd >= CHUNKS * CHUNK_SIZE)
        return NULL;
    struct cp_sock **chunk = __atomic_load_n(&chunks[fd >> CHUNK_BITS], __ATOMIC_ACQUIRE);
    return chunk ? &chunk[fd & (CHUNK_SIZE - 1)] : NULL;
}

static struct cp_sock **make_slot(int fd)
{
    struct cp_sock **s = slot(fd);
    if (s || fd < 0 || fd >= CHUNKS * CHUNK_SIZE)
        return s;
    struct cp_sock **fresh = calloc(CHUNK_SIZE, sizeof(*fresh)), **none = NULL;
    if (!fresh)
        return NULL;
    if (!__atomic_compare_exchange_n(&chunks[fd >> CHUNK_BITS], &none, fresh, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        free(fresh); /* another thread made it first */
    return slot(fd);
}

struct cp_sock *cp_sock_new(int family)
{
    struct cp_sock *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->family = family;
    s->state = CP_FRESH;
    s->ctl = -1, s->lep = -1, s->timer = -1;
    s->peer_bell = -1, s->pending = -1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->rx_lock, NULL);
    return s;
}

int cp_fd_install(int fd, struct cp_sock *s)
{
    struct cp_sock **p = make_slot(fd);
    if (!p)
        return -EMFILE;
    __atomic_add_fetch(&s->refs, 1, __ATOMIC_ACQ_REL);
    pthread_rwlock_wrlock(stripe(fd));
    struct cp_sock *old = *p;
    __atomic_store_n(p, s, __ATOMIC_RELEASE);
    pthread_rwlock_unlock(stripe(fd));
    if (old) /* its descriptor was closed behind our back and reused */
        cp_sock_release(old);
    return 0;
}

void cp_sock_hold(struct cp_sock *s)
{
    __atomic_add_fetch(&s->refs, 1, __ATOMIC_ACQ_REL);
}

/* Under the stripe's write lock: close() takes fd out of the table before it
 * closes the number, so while the slot holds s the number is s's. */
int cp_fd_put_file(int fd, struct cp_sock *s, int file)
{
    int err = 0;
    if (!cp_fd_maybe(fd))
        return 0;
    pthread_rwlock_wrlock(stripe(fd));
    if (__atomic_load_n(slot(fd), __ATOMIC_ACQUIRE) == s) {
        int cloexec = real.fcntl(fd, F_GETFD) & FD_CLOEXEC ? O_CLOEXEC : 0;
        if (real.dup3(file, fd, cloexec) < 0) {
            err = -errno;
        } else {
            int fl = real.fcntl(fd, F_GETFL);
            bool nonblock = __atomic_load_n(&s->nonblock, __ATOMIC_RELAXED);
            if (fl >= 0)
                real.fcntl(fd, F_SETFL, nonblock ? fl | O_NONBLOCK : fl & ~O_NONBLOCK);
        }
    }
    pthread_rwlock_unlock(stripe(fd));
    return err;
}

bool cp_fd_maybe(int fd)
{
    struct cp_sock **p = slot(fd);
    return p && __atomic_load_n(p, __ATOMIC_RELAXED);
}

struct cp_sock *cp_fd_get(int fd)
{
    if (!cp_fd_maybe(fd))
        return NULL;
    pthread_rwlock_rdlock(stripe(fd));
    struct cp_sock *s = __atomic_load_n(slot(fd), __ATOMIC_ACQUIRE);
    if (s)
        __atomic_add_fetch(&s->refs, 1, __ATOMIC_ACQ_REL);
    pthread_rwlock_unlock(stripe(fd));
    if (s)
        cp_call_enter(s);
    return s;
}

bool cp_fd_is(int fd, struct cp_sock *s)
{
    if (!cp_fd_maybe(fd))
        return false;
    pthread_rwlock_rdlock(stripe(fd));
    bool is = __atomic_load_n(slot(fd), __ATOMIC_ACQUIRE) == s;
    pthread_rwlock_unlock(stripe(fd));
    return is;
}

void cp_call_enter(struct cp_sock *s)
{
    /* Sequentially consistent: pairs with cp_udp_retire's fence, so either
     * this call loads the new circuit or the retiring one counts it. */
    if (s->dgram)
        __atomic_add_fetch(&s->calls, 1, __ATOMIC_SEQ_CST);
}

void cp_call_leave(struct cp_sock *s)
{
    if (s->dgram && __atomic_sub_fetch(&s->calls, 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(&s->retired, __ATOMIC_ACQUIRE))
        cp_udp_reap(s);
}

void cp_sock_keep(struct cp_sock *s)
{
    cp_call_leave(s);
}

struct cp_sock *cp_fd_remove(int fd)
{
    if (!cp_fd_maybe(fd))
        return NULL;
    pthread_rwlock_wrlock(stripe(fd));
    struct cp_sock *s = __atomic_exchange_n(slot(fd), NULL, __ATOMIC_ACQ_REL);
    pthread_rwlock_unlock(stripe(fd));
    return s;
}

void cp_sock_put(struct cp_sock *s)
{
    if (!s)
        return;
    cp_call_leave(s);
    cp_sock_release(s);
}

void cp_sock_release(struct cp_sock *s)
{
    if (!s || __atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    cp_connect_abandon(s);
    if (s->c) {
        char a[CP_EP_STR], b[CP_EP_STR];
        cp_log("circuit %llu %s -> %s closed: %llu bytes sent, %llu received",
               (unsigned long long)s->circuit_id, cp_endpoint_str(&s->local, a),
               cp_endpoint_str(&s->remote, b), (unsigned long long)circuit_bytes_sent(s->c),
               (unsigned long long)circuit_bytes_received(s->c));
        if (!cp_procs_leave(s))
            circuit_detach(s->c); /* another process holds it still (fork.c) */
        circuit_free(s->c); /* unless detached, closes our side: the peer reads end of data */
    }
    cp_udp_free(s);
    if (s->ctl >= 0)
        real.close(s->ctl); /* the operator drops the listener with it */
    if (s->lep >= 0)
        real.close(s->lep);
    if (s->timer >= 0)
        real.close(s->timer);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->rx_lock);
    free(s);
}

void cp_fd_each(void (*fn)(int fd, struct cp_sock *s, void *arg), void *arg)
{
    for (int c = 0; c < CHUNKS; c++) {
        if (!__atomic_load_n(&chunks[c], __ATOMIC_ACQUIRE))
            continue;
        for (int fd = c * CHUNK_SIZE; fd < (c + 1) * CHUNK_SIZE; fd++) {
            struct cp_sock *s = cp_fd_get(fd);
            if (s)
                fn(fd, s, arg);
            cp_sock_put(s);
        }
    }
}

void cp_fd_after_fork(void)
{
    /* A child forked while another thread held a stripe must not inherit it held. */
    for (int i = 0; i < STRIPES; i++)
        pthread_rwlock_init(&stripes[i], NULL);
}
