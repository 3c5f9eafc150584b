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
 * The link is polled beside the doorbell: its hang-up wakes us when the peer
 * dies without a word.
 */
#define _GNU_SOURCE
#include <poll.h>
#include <sched.h>
#include <time.h>

#include "internal.h"

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

static bool spin(struct circuit *c, enum circuit_wait_for what, uint64_t need,
                 int64_t deadline)
{
    if (!c->spin_ns)
        return false;
    int64_t stop = circuit_now() + c->spin_ns;
    if (deadline >= 0 && deadline < stop)
        stop = deadline;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (ready(c, what, need))
                return true;
            cpu_relax();
        }
        if (circuit_now() >= stop)
            return false;
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

/* Sleep on our doorbell and the link; 0, -ETIMEDOUT or -EINTR. */
static int sleep_on_bell(struct circuit *c, int64_t deadline, int sleepers)
{
    struct pollfd p[2] = {{.fd = c->bell, .events = POLLIN}, {.fd = c->link, .events = 0}};
    int n = poll(p, c->link >= 0 ? 2 : 1, poll_timeout_ms(deadline));
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
        c->tx_blocked = true;
    store_relaxed(flag, 1);
    full_fence();
    circuit_check_link(c); /* a dead peer's last words are its hang-up */
    if (ready(c, what, need) || (flags & CIRCUIT_NONBLOCK)) {
        if (sleepers == 1)
            circuit_restore_bell(c);
        rc = ready(c, what, need) ? 0 : -EAGAIN;
        goto out;
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

/* Arm both flags and make the doorbell tell the truth now; see circuit_arm_read(). */
int circuit_arm(struct circuit *c)
{
    if (__atomic_load_n(&c->waiters, __ATOMIC_ACQUIRE) == 0)
        circuit_drain_bell(c);
    store_relaxed(&c->rx.ctrl->cons_wait, 1);
    if (c->tx_blocked)
        store_relaxed(&c->tx.ctrl->prod_wait, 1);
    full_fence();
    circuit_check_link(c);
    circuit_restore_bell(c);
    return circuit_readiness(c) & CIRCUIT_READABLE;
}
