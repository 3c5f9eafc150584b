/*
 * epoll.c - epoll_ctl, epoll_wait, epoll_pwait: readiness of circuit
 * sockets from ring state, as in poll.c, for programs that use epoll.
 *
 * The kernel cannot be asked about a connected circuit (its descriptor is a
 * doorbell), so circuit sockets are never put in the program's epoll set.
 * They are kept here, per epoll set, with the events and data the program
 * gave; other descriptors (listeners included) go to the kernel as they are.
 * Each set that holds a circuit gets an inner epoll of their doorbells
 * (edge-triggered: a ring is an edge) and of their peers' doorbell ends
 * (hang-up), put in the program's set under a data value of its own, so a
 * ring wakes a program sleeping in epoll_wait.  Waiting:
 *
 *   1. report the circuits that are ready (circuit_poll);
 *   2. if none, arm the ones that are not ready (circuit_arm_edge: no
 *      system call while a circuit is still armed), look again, then sleep
 *      in the real epoll_pwait on the program's set;
 *   3. drop our inner set's event from what the kernel said (harvesting the
 *      inner set, so that it does not stay readable), and go back to 1.
 *
 * Edge-triggered registrations (EPOLLET) are reported once per readiness,
 * and again after a read or write of that socket said EAGAIN (the program
 * drained it); EPOLLONESHOT disables a registration once reported.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "preload.h"

#define INNER_DATA 0x636972637569747aULL /* "circuitz": our inner set in the program's */
#define EMPTY_WAKES_BEFORE_NAP 3

struct reg {
    int fd;
    struct cp_sock *s; /* a reference of ours */
    uint32_t events;
    epoll_data_t data;
    bool off;             /* EPOLLONESHOT, reported */
    bool parked;          /* the program deleted it; our inner registrations stay for a re-add */
    uint32_t told;        /* EPOLLET: conditions reported and not gone since */
    uint32_t rx_gen, tx_gen; /* the socket's EAGAIN counts when last looked at */
    uint64_t rx_mark;        /* bytes the peer had sent when EPOLLIN was last reported */
    struct reg *next;
};

struct ep {
    int epfd, inner, refs;
    bool hangup; /* atomic: the inner set saw a hang-up; ask the kernel about peers once */
    bool woke;   /* atomic: the inner set fired (drop_inner) */
    pthread_mutex_t lock; /* the registrations */
    struct reg *regs;
    struct ep *next;
};

static pthread_mutex_t eps_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ep *eps;
static int n_eps; /* atomic: 0 lets every epoll call and close pass at once */

static void free_regs(struct reg *r);

/* Drop a reference; never called with a lock held (see unregister). */
static void ep_put(struct ep *e)
{
    if (__atomic_sub_fetch(&e->refs, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    free_regs(e->regs);
    real.close(e->inner);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

static struct ep *find_locked(int epfd)
{
    for (struct ep *e = eps; e; e = e->next)
        if (e->epfd == epfd)
            return e;
    return NULL;
}

/* The record of epfd with a reference, made if `create`; NULL and *err if none. */
static struct ep *ep_get(int epfd, bool create, int *err)
{
    *err = -ENOENT;
    if (!create && !__atomic_load_n(&n_eps, __ATOMIC_ACQUIRE))
        return NULL;
    pthread_mutex_lock(&eps_lock);
    struct ep *e = find_locked(epfd);
    if (!e && create) {
        e = calloc(1, sizeof(*e));
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = INNER_DATA};
        if (!e || (e->inner = cp_hide_fd(real.epoll_create1(EPOLL_CLOEXEC))) < 0 ||
            real.epoll_ctl(epfd, EPOLL_CTL_ADD, e->inner, &ev) < 0) {
            *err = e ? -errno : -ENOMEM;
            if (e && e->inner >= 0)
                real.close(e->inner);
            free(e);
            e = NULL;
        } else {
            e->epfd = epfd;
            e->refs = 1; /* the list's */
            pthread_mutex_init(&e->lock, NULL);
            e->next = eps;
            eps = e;
            __atomic_add_fetch(&n_eps, 1, __ATOMIC_ACQ_REL);
        }
    }
    if (e)
        __atomic_add_fetch(&e->refs, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&eps_lock);
    return e;
}

static struct reg **find_reg(struct ep *e, int fd)
{
    struct reg **p = &e->regs;
    while (*p && (*p)->fd != fd)
        p = &(*p)->next;
    return p;
}

/* Unlink a registration; the caller frees it with free_reg once it holds no
 * lock: dropping the socket may close a circuit, whose descriptors' close()
 * comes back here (cp_epoll_closed). */
static struct reg *unregister(struct ep *e, struct reg **p)
{
    struct reg *r = *p;
    *p = r->next;
    real.epoll_ctl(e->inner, EPOLL_CTL_DEL, r->fd, NULL);
    if (r->s->peer_bell >= 0)
        real.epoll_ctl(e->inner, EPOLL_CTL_DEL, r->s->peer_bell, NULL);
    r->next = NULL;
    return r;
}

static void free_regs(struct reg *r)
{
    for (struct reg *next; r; r = next) {
        next = r->next;
        cp_sock_release(r->s);
        free(r);
    }
}

void cp_epoll_closed(int fd, bool was_circuit)
{
    if (!__atomic_load_n(&n_eps, __ATOMIC_ACQUIRE))
        return;
    struct ep *closed = NULL;
    struct reg *dead = NULL;
    pthread_mutex_lock(&eps_lock);
    for (struct ep **p = &eps; *p;) {
        struct ep *e = *p;
        if (e->epfd == fd) { /* the set itself is closed */
            *p = e->next;
            __atomic_sub_fetch(&n_eps, 1, __ATOMIC_ACQ_REL);
            closed = e;
            continue;
        }
        if (was_circuit) {
            pthread_mutex_lock(&e->lock);
            struct reg **r = find_reg(e, fd);
            if (*r) {
                struct reg *gone = unregister(e, r);
                gone->next = dead;
                dead = gone;
            }
            pthread_mutex_unlock(&e->lock);
        }
        p = &e->next;
    }
    pthread_mutex_unlock(&eps_lock);
    free_regs(dead);
    if (closed)
        ep_put(closed);
}

/* ---- epoll_ctl ----------------------------------------------------------- */

/*
 * Programs such as redis-benchmark delete a socket's interest and add it
 * again on every request.  A delete parks the registration instead: our
 * inner set keeps the doorbell and the peer's hang-up, so the re-add costs
 * no system call (it cost two each way).  A parked registration that wakes
 * the set for nothing is removed for good (drop_parked).
 */
/* (Re)start a registration with the program's events and data. */
static void unpark(struct reg *r, const struct epoll_event *ev)
{
    r->events = ev->events, r->data = ev->data;
    r->parked = r->off = false, r->told = 0;
    r->rx_gen = __atomic_load_n(&r->s->rx_again, __ATOMIC_ACQUIRE);
    r->tx_gen = __atomic_load_n(&r->s->tx_again, __ATOMIC_ACQUIRE);
}

/* Unregister every parked registration; the caller frees what it returns. */
static struct reg *drop_parked(struct ep *e)
{
    struct reg *dead = NULL;
    pthread_mutex_lock(&e->lock);
    for (struct reg **p = &e->regs; *p;) {
        if ((*p)->parked) {
            struct reg *gone = unregister(e, p);
            gone->next = dead;
            dead = gone;
        } else {
            p = &(*p)->next;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return dead;
}

static int add(struct ep *e, int fd, struct cp_sock *s, const struct epoll_event *ev)
{
    struct reg **p = find_reg(e, fd);
    if (*p && (*p)->parked && (*p)->s == s) {
        unpark(*p, ev);
        return 1; /* reused: the registration already holds a reference */
    }
    if (*p)
        return -EEXIST;
    struct reg *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    *r = (struct reg){.fd = fd, .s = s};
    unpark(r, ev); /* the same start as a registration that comes back */
    if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == CP_CONNECTED) {
        /* EPOLLRDHUP: a peer that shut its end of our doorbell is gone (the
         * bell reads end of file); it counts as a hang-up (drop_inner). */
        struct epoll_event bell = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET},
                           hup = {.events = EPOLLET};
        if (real.epoll_ctl(e->inner, EPOLL_CTL_ADD, fd, &bell) < 0) {
            free(r);
            return -errno;
        }
        real.epoll_ctl(e->inner, EPOLL_CTL_ADD, s->peer_bell, &hup); /* EEXIST for a dup: fine */
    }
    r->next = e->regs;
    e->regs = r;
    return 0;
}

static int ctl(struct ep *e, int op, int fd, struct cp_sock *s, struct epoll_event *ev,
               struct reg **dead)
{
    struct reg **p = find_reg(e, fd);
    if (op == EPOLL_CTL_ADD)
        return ev ? add(e, fd, s, ev) : -EFAULT;
    if (!*p || (*p)->parked)
        return -ENOENT;
    if (op == EPOLL_CTL_DEL) {
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == CP_CONNECTED)
            (*p)->parked = true;
        else
            *dead = unregister(e, p);
        return 0;
    }
    if (op != EPOLL_CTL_MOD)
        return -EINVAL;
    if (!ev)
        return -EFAULT;
    (*p)->events = ev->events, (*p)->data = ev->data;
    (*p)->off = false, (*p)->told = 0;
    return 0;
}

CP_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s || !cp_computed(s)) { /* listeners and placeholders: the kernel's */
        struct epoll_event plain;
        /* A listener's descriptor is an epoll instance, which the kernel
         * refuses EPOLLEXCLUSIVE for (nginx asks it): every waiter wakes,
         * and one takes the circuit, as without it. */
        if (s && ev && (ev->events & EPOLLEXCLUSIVE) &&
            __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == CP_LISTENING) {
            plain = *ev;
            plain.events &= ~(uint32_t)EPOLLEXCLUSIVE;
            ev = &plain;
        }
        cp_sock_put(s);
        return real.epoll_ctl(epfd, op, fd, ev);
    }
    int err;
    struct ep *e = ep_get(epfd, op == EPOLL_CTL_ADD, &err);
    if (!e) {
        cp_sock_put(s);
        return (int)cp_ret(err);
    }
    struct reg *dead = NULL;
    pthread_mutex_lock(&e->lock);
    err = ctl(e, op, fd, s, ev, &dead);
    pthread_mutex_unlock(&e->lock);
    free_regs(dead);
    if (op != EPOLL_CTL_ADD || err) /* an added registration keeps the reference */
        cp_sock_put(s);
    else
        cp_sock_keep(s); /* a registration is no call in flight (udp.c) */
    if (err == 1) /* a parked registration came back: it holds one already */
        err = 0;
    ep_put(e);
    return (int)cp_ret(err);
}

/* ---- epoll_wait ---------------------------------------------------------- */

/* EPOLLET: the conditions not reported since they last came. */
static uint32_t edge(struct reg *r, uint32_t ready)
{
    uint32_t rx = __atomic_load_n(&r->s->rx_again, __ATOMIC_ACQUIRE);
    uint32_t tx = __atomic_load_n(&r->s->tx_again, __ATOMIC_ACQUIRE);
    /* New data is a new edge, as the kernel reports one per arrival: nginx
     * takes a short read for drained and waits for the next edge, never
     * reading to EAGAIN. */
    uint64_t mark = (ready & EPOLLIN) ? cp_arrived(r->s) : r->rx_mark;
    if (rx != r->rx_gen || mark != r->rx_mark)
        r->told &= ~(uint32_t)EPOLLIN, r->rx_gen = rx, r->rx_mark = mark;
    if (tx != r->tx_gen)
        r->told &= ~(uint32_t)EPOLLOUT, r->tx_gen = tx;
    r->told &= ready; /* a condition that went away may be reported when it comes back */
    uint32_t fresh = ready & ~r->told;
    r->told |= fresh;
    return fresh ? ready : 0;
}

/* A peer's death shows as a hang-up in the inner set (drop_inner notes it):
 * until one does, readiness is the ring's alone, with no system call per
 * circuit per look (a poll(2) each made epoll loops of many circuits slow). */
static uint32_t ready_of(struct reg *r, bool ask_kernel)
{
    cp_call_enter(r->s); /* a UDP socket's circuit stays mapped while we look (udp.c) */
    uint32_t ready = (uint16_t)cp_revents(r->s, (short)(r->events & 0xffff), ask_kernel);
    cp_call_leave(r->s);
    return ready;
}

/* Report ready circuits; with `arm`, arm those that are not ready. */
static int collect(struct ep *e, struct epoll_event *out, int max, bool arm)
{
    int n = 0;
    pthread_mutex_lock(&e->lock);
    bool ask = __atomic_exchange_n(&e->hangup, false, __ATOMIC_ACQ_REL);
    for (struct reg *r = e->regs; r; r = r->next) {
        if (r->off || r->parked)
            continue;
        if (n >= max) { /* no room to report: just learn of vanished peers */
            if (ask)
                ready_of(r, true);
            continue;
        }
        uint32_t ready = ready_of(r, ask);
        if (arm && !ready) {
            /* Armed, look again: what came before the flag went up rang nobody.
             * Counted in as a call: arming touches the circuit (udp.c retires). */
            cp_call_enter(r->s);
            cp_arm(r->s, (short)(r->events & 0xffff), true);
            cp_call_leave(r->s);
            ready = ready_of(r, false);
        }
        if (ready && (r->events & EPOLLET))
            ready = edge(r, ready);
        if (!ready)
            continue;
        out[n++] = (struct epoll_event){.events = ready, .data = r->data};
        if (r->events & EPOLLONESHOT)
            r->off = true;
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* Take our inner set's event out of the kernel's answer; harvest the inner set. */
static int drop_inner(struct ep *e, struct epoll_event *ev, int k)
{
    int kept = 0;
    bool inner = false;
    for (int i = 0; i < k; i++) {
        if (ev[i].data.u64 == INNER_DATA)
            inner = true;
        else
            ev[kept++] = ev[i];
    }
    struct epoll_event junk[64];
    int got = 64;
    if (inner)
        __atomic_store_n(&e->woke, true, __ATOMIC_RELEASE);
    while (inner && got == 64) {
        got = real.epoll_wait(e->inner, junk, 64, 0);
        for (int i = 0; i < got; i++)
            if (junk[i].events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP))
                __atomic_store_n(&e->hangup, true, __ATOMIC_RELEASE);
    }
    return kept;
}

struct look {
    struct ep *e;
    struct epoll_event *ev;
    int max, n;
};

static bool any_ready(void *arg)
{
    struct look *l = arg;
    return (l->n = collect(l->e, l->ev, l->max, false)) > 0;
}

static int wait_loop(struct ep *e, struct epoll_event *ev, int max, int64_t deadline,
                     const sigset_t *mask)
{
    struct look look = {e, ev, max, 0};
    for (int empty = 0;; empty++) {
        int n = collect(e, ev, max, false);
        bool wait = n == 0 && cp_ms_until(deadline) != 0;
        if (wait && !empty && cp_spin(any_ready, &look, deadline)) /* before a sleep */
            n = look.n, wait = false;
        if (wait)
            wait = (n = collect(e, ev, max, true)) == 0;
        if (n < max) {
            int k = real.epoll_pwait(e->epfd, ev + n, max - n, wait ? cp_ms_until(deadline) : 0, mask);
            if (k < 0)
                return n ? n : -errno;
            n += drop_inner(e, ev + n, k);
        }
        bool woke = __atomic_exchange_n(&e->woke, false, __ATOMIC_ACQ_REL);
        if (woke && !n)
            free_regs(drop_parked(e)); /* a parked doorbell rang for nothing */
        if (n || !wait || cp_ms_until(deadline) == 0)
            return n;
        if (empty >= EMPTY_WAKES_BEFORE_NAP)
            usleep(1000); /* rings we cannot drain (another thread sleeps on them) */
    }
}

CP_EXPORT int epoll_pwait(int epfd, struct epoll_event *ev, int max, int timeout,
                          const sigset_t *mask)
{
    cp_init();
    int err;
    struct ep *e = max > 0 && ev ? ep_get(epfd, false, &err) : NULL;
    if (!e)
        return real.epoll_pwait(epfd, ev, max, timeout, mask);
    int64_t deadline = timeout < 0 ? -1 : cp_now_ns() + (int64_t)timeout * 1000000LL;
    int rc = wait_loop(e, ev, max, deadline, mask);
    ep_put(e);
    return (int)cp_ret(rc);
}

/* epoll_pwait2: the same, with a timespec (our waits have milliseconds). */
CP_EXPORT int epoll_pwait2(int epfd, struct epoll_event *ev, int max, const struct timespec *ts,
                           const sigset_t *mask)
{
    cp_init();
    int err;
    struct ep *e = max > 0 && ev ? ep_get(epfd, false, &err) : NULL;
    if (!e) {
        if (!real.epoll_pwait2)
            return (int)cp_ret(-ENOSYS);
        return real.epoll_pwait2(epfd, ev, max, ts, mask);
    }
    if (ts && (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000L)) {
        ep_put(e);
        return (int)cp_ret(-EINVAL);
    }
    int64_t deadline = ts ? cp_now_ns() + (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec : -1;
    int rc = wait_loop(e, ev, max, deadline, mask);
    ep_put(e);
    return (int)cp_ret(rc);
}

CP_EXPORT int epoll_wait(int epfd, struct epoll_event *ev, int max, int timeout)
{
    return epoll_pwait(epfd, ev, max, timeout, NULL);
}
