/*
 * wait.c - waiting for the peer: spin briefly, then sleep on our doorbell.
 *
 * Sleeping follows the need-wakeup protocol: drain old rings, raise our
 * need-wakeup flag, full fence, look at the ring once more, and only then
 * sleep.  The peer publishes, fences, and rings only if the flag was up
 * (taking it down as it rings), so a ring is never lost and never sent to a
 * consumer that is awake.  Spinning is bounded by spin_ns: two unbounded
 * spinners sharing a core starve each other (see the design brief).
 *
 * Several threads of one process may sleep on one doorbell (one receiving,
 * one sending).  A ring wakes them all; a thread drains the doorbell only
 * when no other thread is sleeping on it, so it never eats another's ring.
 * Our peer_bell is polled beside the doorbell: its hang-up wakes us when the
 * peer dies without a word.  A sleeper that had to ring the doorbell again
 * for others' work (a poller's) sleeps on its next ring instead (epoll,
 * edge-triggered), since the doorbell stays readable.
 */
#define _GNU_SOURCE
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define YIELD_AFTER_NS 5000
#define EDGE_SLICE_MS 10
#define EDGE_DRAIN_EVERY 16 /* far below the rings a doorbell's queue holds (hundreds) */

int64_t circuit_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Can the waiter go on: enough data or space, or an end to report? */
static bool ready(struct circuit *c, enum circuit_wait_for what, uint64_t need)
{
    uint64_t n;
    if (c->closed)
        return true;
    if (what == WAIT_RX)
        return circuit_rx_avail(c, &n) < 0 || n > 0 || circuit_rx_end(c) != 0;
    return circuit_tx_free(c, &n) < 0 || n >= need || circuit_tx_end(c) != 0;
}

/*
 * Whoever drains the doorbell raises what a poller of it relies on: data
 * always, room when a non-blocking send was refused.  Then the next publish
 * or release rings again, so no poller's ring is lost to the drain.
 */
static void raise_poller_flags(struct circuit *c)
{
    store_relaxed(&c->rx.ctrl->cons_wait, 1);
    if (c->tx_need || __atomic_load_n(&c->tx_wait, __ATOMIC_ACQUIRE))
        store_relaxed(&c->tx.ctrl->prod_wait, 1);
}

static bool spin(struct circuit *c, enum circuit_wait_for what, uint64_t need,
                 int64_t deadline)
{
    if (!c->spin_ns)
        return false;
    int64_t start = circuit_now(), stop = start + c->spin_ns;
    if (deadline >= 0 && deadline < stop)
        stop = deadline;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (ready(c, what, need))
                return true;
            cpu_relax();
        }
        int64_t now = circuit_now();
        if (now >= stop)
            return false;
        /* Past a short while, the peer may be waiting for our core: let it run. */
        if (now - start > YIELD_AFTER_NS)
            sched_yield();
    }
}

static int poll_timeout_ms(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - circuit_now();
    if (left <= 0)
        return 0;
    int64_t ms = (left + 999999) / 1000000;
    return ms > 60000 ? 60000 : (int)ms;
}

/* Sleep on our doorbell and the peer's hang-up; 0, -ETIMEDOUT or -EINTR. */
static int sleep_on_bell(struct circuit *c, int64_t deadline, int sleepers)
{
    struct pollfd p[2] = {{.fd = c->bell, .events = POLLIN}, {.fd = c->peer_bell, .events = 0}};
    int n = poll(p, 2, poll_timeout_ms(deadline));
    if (n < 0)
        return errno == EINTR ? -EINTR : -errno;
    if (n == 0 && deadline >= 0 && circuit_now() >= deadline)
        return -ETIMEDOUT;
    if (p[1].revents & (POLLHUP | POLLERR))
        c->peer_gone = true;
    if (n > 0 && sleepers > 1)
        sched_yield(); /* let the other sleeper see the ring before one drains it */
    return 0;
}

/*
 * Sleep until our doorbell is rung again (an edge), not while it is readable
 * (its level): we keep it readable for others' work, so its level says
 * nothing to us.  We loop here, raising our flag and looking before each
 * sleep as arm_and_sleep does, but never drain or restore: a restore would
 * wake another edge sleeper, whose restore would wake us, and so on.  The
 * peer's hang-up is watched as a level.  0, -ETIMEDOUT or -EINTR.
 */
static int sleep_on_edge(struct circuit *c, enum circuit_wait_for what, uint64_t need,
                         int64_t deadline)
{
    uint32_t *flag = what == WAIT_RX ? &c->rx.ctrl->cons_wait : &c->tx.ctrl->prod_wait;
    struct epoll_event ev[2], bell = {.events = EPOLLIN | EPOLLET, .data.u32 = 0},
                              hup = {.events = 0, .data.u32 = 1};
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, c->bell, &bell) < 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, c->peer_bell, &hup) < 0) {
        /* No epoll to spare (EMFILE...): nap briefly, then look again. */
        struct pollfd p = {.fd = c->peer_bell, .events = 0};
        int ms = poll_timeout_ms(deadline);
        if (poll(&p, 1, ms < 0 || ms > 10 ? 10 : ms) > 0 && (p.revents & (POLLHUP | POLLERR)))
            c->peer_gone = true;
        if (ep >= 0)
            close(ep);
        return 0;
    }
    /* The level we left is reported once: take it.  A ring that came before
     * we registered is covered by the look below; every later one is an edge. */
    epoll_wait(ep, ev, 2, 0);
    int rc = 0;
    for (;;) {
        store_relaxed(flag, 1); /* the ring that woke us took it down */
        full_fence();
        circuit_check_peer(c);
        if (ready(c, what, need))
            break;
        /* Bounded: we never drain, so once the doorbell's queue is full a
         * ring makes no new edge; a slice makes that cost latency, not a hang. */
        int ms = poll_timeout_ms(deadline);
        int n = epoll_wait(ep, ev, 2, ms < 0 || ms > EDGE_SLICE_MS ? EDGE_SLICE_MS : ms);
        if (n < 0) {
            rc = errno == EINTR ? -EINTR : -errno;
            break;
        }
        if (n == 0 && deadline >= 0 && circuit_now() >= deadline) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    close(ep);
    return rc;
}

/*
 * Raise our need-wakeup flag, look once more, then sleep (unless NONBLOCK).
 * Whoever drains the doorbell restores it if work is waiting (state.c).
 */
static int arm_and_sleep(struct circuit *c, enum circuit_wait_for what, uint64_t need,
                         int flags, int64_t deadline)
{
    uint32_t *flag = what == WAIT_RX ? &c->rx.ctrl->cons_wait : &c->tx.ctrl->prod_wait;
    int rc = 0;
    /* Counting in and draining are one step: a thread that came in first
     * keeps its ring (we see it and do not drain); one that comes in during
     * our drain waits, then raises its flag and looks after the drain.  With
     * a bare counter, a second sleeper could raise its flag, look, and have
     * the ring that answers it drained by a first one that counted in
     * earlier but read the doorbell later: a lost wakeup. */
    pthread_mutex_lock(&c->bell_lock);
    int sleepers = __atomic_add_fetch(&c->waiters, 1, __ATOMIC_ACQ_REL);
    if (sleepers == 1)
        circuit_drain_bell(c);
    pthread_mutex_unlock(&c->bell_lock);
    if (what == WAIT_TX && (flags & CIRCUIT_NONBLOCK))
        c->tx_need = need;
    store_relaxed(flag, 1);
    if (sleepers == 1)
        raise_poller_flags(c); /* the drained rings may have been a poller's */
    full_fence();
    /* A dead peer's last words are its hang-up.  A sleeper hears it in its
     * sleep (sleep_on_bell polls peer_bell too), so only a call that will
     * not sleep asks now: one system call less per sleep. */
    if (flags & CIRCUIT_NONBLOCK)
        circuit_check_peer(c);
    if (ready(c, what, need) || (flags & CIRCUIT_NONBLOCK)) {
        if (sleepers == 1)
            circuit_restore_bell(c);
        rc = ready(c, what, need) ? 0 : -EAGAIN;
        goto out;
    }
    if (sleepers == 1 && circuit_restore_bell(c)) {
        /* We drained a ring that work of others (a poller's data, room for
         * a refused send, a sender asleep on an edge) still needs, and rang
         * again for it: the bell stays readable, so we cannot sleep on its
         * level (we would spin), and a bare level sleep here would have
         * stranded that poller.  Sleep on the next ring instead, uncounted:
         * others may drain meanwhile, and whoever drains restores the bell
         * for us too (readable data, or room for tx_wait). */
        if (what == WAIT_TX)
            __atomic_store_n(&c->tx_wait, need, __ATOMIC_RELEASE);
        __atomic_sub_fetch(&c->waiters, 1, __ATOMIC_ACQ_REL);
        rc = sleep_on_edge(c, what, need, deadline);
        if (what == WAIT_TX)
            __atomic_store_n(&c->tx_wait, 0, __ATOMIC_RELEASE);
        return rc;
    }
    rc = sleep_on_bell(c, deadline, sleepers);
out:
    __atomic_sub_fetch(&c->waiters, 1, __ATOMIC_ACQ_REL);
    return rc;
}

/*
 * Wait until `what` can make progress.  Returns 0 to look again, or
 * -EAGAIN, -ETIMEDOUT, -EINTR.
 */
int circuit_wait(struct circuit *c, enum circuit_wait_for what, uint64_t need,
                 int flags, int64_t deadline)
{
    if (deadline >= 0 && circuit_now() >= deadline)
        return -ETIMEDOUT;
    if (!(flags & CIRCUIT_NONBLOCK) && spin(c, what, need, deadline))
        return 0;
    return arm_and_sleep(c, what, need, flags, deadline);
}

int circuit_lock(pthread_mutex_t *m, int flags, int64_t deadline)
{
    int err = pthread_mutex_trylock(m);
    if (err != EBUSY)
        return -err;
    if (flags & CIRCUIT_NONBLOCK)
        return -EAGAIN;
    if (deadline < 0)
        return -pthread_mutex_lock(m);
    struct timespec ts = {.tv_sec = deadline / 1000000000LL, .tv_nsec = deadline % 1000000000LL};
    err = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
    return err ? -err : 0;
}

/* Arm the flags and make the doorbell tell the truth now; see circuit_arm_read(). */
int circuit_arm(struct circuit *c)
{
    if (c->broken)
        return CIRCUIT_READABLE; /* never touch a broken circuit's memory again */
    pthread_mutex_lock(&c->bell_lock);
    bool alone = __atomic_load_n(&c->waiters, __ATOMIC_ACQUIRE) == 0;
    if (alone)
        circuit_drain_bell(c);
    pthread_mutex_unlock(&c->bell_lock);
    raise_poller_flags(c);
    full_fence();
    circuit_check_peer(c);
    if (alone)
        circuit_restore_bell(c);
    return circuit_readiness(c) & CIRCUIT_READABLE;
}

/* Our flags as a poller needs them: data always, room when a send was refused. */
static bool flags_up(struct circuit *c)
{
    if (!load_relaxed(&c->rx.ctrl->cons_wait))
        return false;
    return !(c->tx_need || __atomic_load_n(&c->tx_wait, __ATOMIC_ACQUIRE)) ||
           load_relaxed(&c->tx.ctrl->prod_wait);
}

/*
 * See circuit.h.  A flag still up was raised, and fenced, by an earlier arm:
 * a publish since then sees it and rings, so there is nothing to do.  A flag
 * the peer took down cost it a ring, one more byte in our doorbell's queue;
 * raising it again (and the fence before the caller's next look) is all the
 * edge watcher needs, and a full arm drains the queue every few times.
 */
int circuit_arm_edge(struct circuit *c)
{
    if (c->broken)
        return CIRCUIT_READABLE;
    if (flags_up(c))
        return 0; /* the caller looks at the ring next: it does not need our answer */
    if (__atomic_add_fetch(&c->edge_raises, 1, __ATOMIC_RELAXED) >= EDGE_DRAIN_EVERY) {
        __atomic_store_n(&c->edge_raises, 0, __ATOMIC_RELAXED);
        circuit_arm_read(c); /* drains, unless a thread inside a call will */
    }
    raise_poller_flags(c);
    full_fence();
    return circuit_readiness(c) & CIRCUIT_READABLE;
}
