/*
 * epoll.c - epoll_ctl, epoll_wait, epoll_pwait: readiness of circuit
 * sockets from ring state, as in poll.c, for programs that use epoll.
 *
 * The kernel cannot be asked about a connected circuit (its descriptor is a
 * doorbell), so circuit sockets are never put in the program's epoll set as
 * they are.  Every registration of a circuit socket is kept here, per epoll
 * set, with the events and data the program gave, whatever the socket's
 * state; other descriptors go to the kernel as they are.  What a
 * registration watches follows the socket's state (hook):
 *
 *   fresh       nothing: ready as a kernel socket that never connected
 *               (writable, and hung up for TCP)
 *   connecting  the control connection its CONNECT's answer comes on
 *               (connect.c): the answer is settled here, then the socket is
 *               connected or failed
 *   connected   its doorbell (edge-triggered: a ring is an edge) and its
 *               peer's doorbell end (hang-up): readiness from ring state
 *   failed      nothing: writable, error and hang-up, as the kernel's
 *   listening   the listener's epoll of its control connection, put in the
 *               program's set under the program's own events and data: the
 *               kernel answers for it
 *
 * The first four are watched through an inner epoll of ours, put in the
 * program's set under a data value of its own, so a ring or an answer wakes
 * a program sleeping in epoll_wait (even one whose wait began before the set
 * held a circuit socket: passed_through keeps that value from it).  When
 * the socket changes state (it connects, listens, re-connects, an answer
 * settles it), cp_epoll_follow moves each of its registrations to the new
 * descriptors and pokes the set (an eventfd in the inner set) so that a
 * sleeper looks again; epoll_ctl pokes it when what it registered is ready
 * and a thread sleeps on the set.  Waiting:
 *
 *   1. settle the connects whose answers came; report the circuits that
 *      are ready (circuit_poll);
 *   2. if none, arm the ones that are not ready (circuit_arm_edge: no
 *      system call while a circuit is still armed), look again, then sleep
 *      in the real epoll_pwait on the program's set;
 *   3. drop our inner set's event from what the kernel said (harvesting the
 *      inner set, so that it does not stay readable), and go back to 1.
 *
 * Edge-triggered registrations (EPOLLET) are reported once per readiness,
 * and again after a read or write of that socket said EAGAIN (the program
 * drained it), or once it changed state; EPOLLONESHOT disables a
 * registration once reported.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "preload.h"

#define INNER_DATA 0x636972637569747aULL /* "circuitz": our inner set in the program's */
#define EMPTY_WAKES_BEFORE_NAP 3

/* What woke the inner set: the data of its registrations. */
enum { WATCH_BELL, WATCH_ANSWER, WATCH_POKE };

struct reg {
    int fd;
    struct cp_sock *s; /* a reference of ours */
    uint32_t events;
    epoll_data_t data;
    bool off;             /* EPOLLONESHOT, reported */
    bool parked;          /* the program deleted it; our inner registrations stay for a re-add */
    bool rings;           /* watching a circuit's doorbell */
    int kfd;              /* a listener: its epoll, in the program's set for this one; else -1 */
    int watch[2];         /* what the inner set watches for it; -1: nothing */
    uint32_t told;        /* EPOLLET: conditions reported and not gone since */
    uint32_t rx_gen, tx_gen; /* the socket's EAGAIN counts when last looked at */
    uint64_t rx_mark;        /* bytes the peer had sent when EPOLLIN was last reported */
    struct reg *next;
};

struct ep {
    int epfd, inner, poke, refs;
    int rings;   /* registrations watching a doorbell, worth a spin before sleeping (atomic) */
    int sleepers; /* waits about to sleep in the kernel, or asleep (atomic): epoll_ctl pokes them */
    bool hangup; /* atomic: the inner set saw a hang-up; ask the kernel about peers once */
    bool woke;   /* atomic: the inner set fired (drop_inner) */
    bool answer; /* atomic: a connect's answer came (drop_inner): settle it */
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
    real.close(e->poke);
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

/* Wake whoever sleeps on the program's set: a registration moved or came. */
static void poke(struct ep *e)
{
    uint64_t one = 1;
    if (real.write(e->poke, &one, sizeof(one)) < 0)
        return; /* the counter cannot overflow in practice; a wake is all we want */
}

/* A new record of epfd: our inner set, with the poke in it, in the program's set. */
static struct ep *ep_new(int epfd, int *err)
{
    struct ep *e = calloc(1, sizeof(*e));
    if (!e) {
        *err = -ENOMEM;
        return NULL;
    }
    e->epfd = epfd;
    e->inner = cp_hide_fd(real.epoll_create1(EPOLL_CLOEXEC));
    e->poke = cp_hide_fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    struct epoll_event in = {.events = EPOLLIN, .data.u64 = INNER_DATA},
                       pk = {.events = EPOLLIN | EPOLLET, .data.u64 = WATCH_POKE};
    if (e->inner < 0 || e->poke < 0 || real.epoll_ctl(e->inner, EPOLL_CTL_ADD, e->poke, &pk) < 0 ||
        real.epoll_ctl(epfd, EPOLL_CTL_ADD, e->inner, &in) < 0) {
        *err = -errno;
        if (e->inner >= 0)
            real.close(e->inner);
        if (e->poke >= 0)
            real.close(e->poke);
        free(e);
        return NULL;
    }
    e->refs = 1; /* the list's */
    pthread_mutex_init(&e->lock, NULL);
    poke(e); /* a wait that began before this record is the kernel's alone: look (passed_through) */
    return e;
}

/* The record of epfd with a reference, made if `create`; NULL and *err if none. */
static struct ep *ep_get(int epfd, bool create, int *err)
{
    *err = -ENOENT;
    if (!create && !__atomic_load_n(&n_eps, __ATOMIC_ACQUIRE))
        return NULL;
    pthread_mutex_lock(&eps_lock);
    struct ep *e = find_locked(epfd);
    if (!e && create && (e = ep_new(epfd, err))) {
        e->next = eps;
        eps = e;
        __atomic_add_fetch(&n_eps, 1, __ATOMIC_ACQ_REL);
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

/* ---- what a registration watches ------------------------------------------ */

static int state_of(struct cp_sock *s) { return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE); }

/* Does another registration in e (a dup of the same socket) watch fd too? */
static bool watched_by_other(struct ep *e, struct reg *r, int fd)
{
    for (struct reg *q = e->regs; q; q = q->next)
        if (q != r && (q->watch[0] == fd || q->watch[1] == fd))
            return true;
    return false;
}

/* Take r off whatever it watches (e->lock held). */
static void unhook(struct ep *e, struct reg *r)
{
    if (r->kfd >= 0)
        real.epoll_ctl(e->epfd, EPOLL_CTL_DEL, r->kfd, NULL);
    for (int i = 0; i < 2; i++)
        if (r->watch[i] >= 0 && !watched_by_other(e, r, r->watch[i]))
            real.epoll_ctl(e->inner, EPOLL_CTL_DEL, r->watch[i], NULL);
    if (r->rings)
        __atomic_sub_fetch(&e->rings, 1, __ATOMIC_RELAXED);
    r->kfd = r->watch[0] = r->watch[1] = -1;
    r->rings = false;
}

/* Watch fd in the inner set for r; a dup's registration may watch it already. */
static int watch(struct ep *e, struct reg *r, int i, int fd, uint32_t events, uint64_t what)
{
    struct epoll_event ev = {.events = events, .data.u64 = what};
    if (fd < 0)
        return 0;
    if (real.epoll_ctl(e->inner, EPOLL_CTL_ADD, fd, &ev) < 0 && errno != EEXIST)
        return -errno;
    r->watch[i] = fd;
    return 0;
}

/* Put r on what its socket's state calls for (e->lock held, r unhooked). */
static int hook(struct ep *e, struct reg *r)
{
    struct cp_sock *s = r->s;
    int err = 0;
    r->told = 0; /* a new state is a new edge, as a kernel socket's connect is */
    switch (state_of(s)) {
    case CP_LISTENING: {
        /* EPOLLEXCLUSIVE: the kernel refuses it for an epoll instance (nginx
         * asks it); every waiter wakes, and one takes the circuit. */
        struct epoll_event ev = {.events = r->events & ~(uint32_t)EPOLLEXCLUSIVE, .data = r->data};
        if (real.epoll_ctl(e->epfd, EPOLL_CTL_ADD, s->lep, &ev) < 0)
            return -errno;
        r->kfd = s->lep;
        return 0;
    }
    case CP_CONNECTING:
        return watch(e, r, 0, s->pending, EPOLLIN, WATCH_ANSWER); /* level: until settled */
    case CP_CONNECTED:
        /* EPOLLRDHUP: a peer that shut its end of our doorbell is gone (the
         * bell reads end of file); it counts as a hang-up (drop_inner). */
        err = watch(e, r, 0, circuit_bell(s->c), EPOLLIN | EPOLLRDHUP | EPOLLET, WATCH_BELL);
        if (!err)
            err = watch(e, r, 1, s->peer_bell, EPOLLET, WATCH_BELL);
        if (err) {
            unhook(e, r);
            return err;
        }
        r->rings = true;
        __atomic_add_fetch(&e->rings, 1, __ATOMIC_RELAXED);
        return 0;
    default:
        return 0; /* fresh or failed: ready as they are, nothing to wait for */
    }
}

/* Unlink a registration; the caller frees it with free_reg once it holds no
 * lock: dropping the socket may close a circuit, whose descriptors' close()
 * comes back here (cp_epoll_closed). */
static struct reg *unregister(struct ep *e, struct reg **p)
{
    struct reg *r = *p;
    *p = r->next;
    r->next = NULL;
    unhook(e, r);
    return r;
}

static void free_regs(struct reg *r)
{
    for (struct reg *next; r; r = next) {
        next = r->next;
        __atomic_sub_fetch(&r->s->epolls, 1, __ATOMIC_ACQ_REL);
        cp_sock_release(r->s);
        free(r);
    }
}

/* fn on every registration of s in every set (each set's lock held); the
 * sets whose registrations fn moved are poked.  fn may unlink a registration
 * (returning it, to be freed here) or keep it (returning NULL). */
static void each_reg(struct cp_sock *s, struct reg *(*fn)(struct ep *, struct reg **, int),
                     int arg)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the new state is out before the count is read (add) */
    if (!__atomic_load_n(&s->epolls, __ATOMIC_ACQUIRE) || !__atomic_load_n(&n_eps, __ATOMIC_ACQUIRE))
        return;
    struct reg *dead = NULL;
    pthread_mutex_lock(&eps_lock);
    for (struct ep *e = eps; e; e = e->next) {
        bool moved = false;
        pthread_mutex_lock(&e->lock);
        for (struct reg **p = &e->regs; *p;) {
            struct reg *r = *p, *gone = NULL;
            if (r->s == s) {
                moved = true;
                gone = fn(e, p, arg);
            }
            if (gone) {
                gone->next = dead;
                dead = gone;
            } else {
                p = &r->next;
            }
        }
        pthread_mutex_unlock(&e->lock);
        if (moved)
            poke(e);
    }
    pthread_mutex_unlock(&eps_lock);
    free_regs(dead);
}

static struct reg *follow(struct ep *e, struct reg **p, int unused)
{
    (void)unused;
    struct reg *r = *p;
    if (r->parked && state_of(r->s) != CP_CONNECTED)
        return unregister(e, p); /* deleted by the program: kept for a circuit's re-add only */
    unhook(e, r);
    int err = hook(e, r);
    if (err)
        cp_warn("epoll: the registration of fd %d cannot follow its socket: %s", r->fd,
                strerror(-err));
    return NULL;
}

static struct reg *unhook_one(struct ep *e, struct reg **p, int unused)
{
    (void)unused;
    unhook(e, *p);
    return NULL;
}

/* A socket handed to the kernel: its registration on that number becomes the kernel's. */
static struct reg *to_kernel(struct ep *e, struct reg **p, int fd)
{
    struct reg *r = *p;
    if (r->fd != fd)
        return NULL;
    struct epoll_event ev = {.events = r->events, .data = r->data};
    struct reg *gone = unregister(e, p);
    if (!gone->parked && !gone->off)
        real.epoll_ctl(e->epfd, EPOLL_CTL_ADD, gone->fd, &ev);
    return gone;
}

void cp_epoll_follow(struct cp_sock *s) { each_reg(s, follow, -1); }

void cp_epoll_unhook(struct cp_sock *s) { each_reg(s, unhook_one, -1); }

void cp_epoll_handed_back(int fd, struct cp_sock *s) { each_reg(s, to_kernel, fd); }

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

/* ---- fork ---------------------------------------------------------------- */

/* In lock order: the list, then each set's (as each_reg takes them). */
void cp_epoll_before_fork(void)
{
    pthread_mutex_lock(&eps_lock);
    for (struct ep *e = eps; e; e = e->next)
        pthread_mutex_lock(&e->lock);
}

/* Parent and child alike: the thread that took them gives them back. */
void cp_epoll_after_fork(void)
{
    for (struct ep *e = eps; e; e = e->next)
        pthread_mutex_unlock(&e->lock);
    pthread_mutex_unlock(&eps_lock);
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

static int add(struct ep *e, int fd, struct cp_sock *s, const struct epoll_event *ev,
               struct reg **dead)
{
    struct reg **p = find_reg(e, fd);
    if (*p && (*p)->parked && (*p)->s == s) {
        unpark(*p, ev);
        return 1; /* reused: the registration already holds a reference */
    }
    if (*p && (*p)->parked)
        *dead = unregister(e, p); /* another socket was put on the number (dup2) */
    else if (*p)
        return -EEXIST;
    struct reg *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    *r = (struct reg){.fd = fd, .s = s, .kfd = -1, .watch = {-1, -1}};
    unpark(r, ev); /* the same start as a registration that comes back */
    /* Counted before hook reads the state: a state change that does not see
     * the count is one hook sees, and one that does waits for e->lock, then
     * finds r linked (each_reg). */
    __atomic_add_fetch(&s->epolls, 1, __ATOMIC_SEQ_CST);
    int err = hook(e, r);
    if (err) {
        __atomic_sub_fetch(&s->epolls, 1, __ATOMIC_ACQ_REL);
        free(r);
        return err;
    }
    r->next = e->regs;
    e->regs = r;
    return 0;
}

static int modify(struct ep *e, struct reg *r, const struct epoll_event *ev)
{
    r->events = ev->events, r->data = ev->data;
    r->off = false, r->told = 0;
    struct epoll_event k = {.events = ev->events & ~(uint32_t)EPOLLEXCLUSIVE, .data = ev->data};
    if (r->kfd >= 0 && real.epoll_ctl(e->epfd, EPOLL_CTL_MOD, r->kfd, &k) < 0)
        return -errno;
    return 0;
}

static int ctl(struct ep *e, int op, int fd, struct cp_sock *s, struct epoll_event *ev,
               struct reg **dead)
{
    struct reg **p = find_reg(e, fd);
    if (op == EPOLL_CTL_ADD)
        return ev ? add(e, fd, s, ev, dead) : -EFAULT;
    if (!*p || (*p)->parked)
        return -ENOENT;
    if (op == EPOLL_CTL_DEL) {
        if ((*p)->rings)
            (*p)->parked = true;
        else
            *dead = unregister(e, p);
        return 0;
    }
    if (op != EPOLL_CTL_MOD)
        return -EINVAL;
    return ev ? modify(e, *p, ev) : -EFAULT;
}

static uint32_t ready_of(struct reg *r, bool ask_kernel);

/* Does what epoll_ctl just added or changed on fd wake a thread asleep on e
 * (e->lock held)?  The kernel looks at a registration as it is made and wakes
 * a waiter if it is ready.  No edge is used up here: the waiter reports it.
 * A registration not ready is armed first: the sleeper armed the set before
 * it was on (an ADD, an EPOLLONESHOT one MODded on again after another
 * thread read to EAGAIN), and the peer rings only a raised flag, so its next
 * data would wake nobody.  No system call while the flags are still up. */
static bool wakes(struct ep *e, int fd)
{
    if (!__atomic_load_n(&e->sleepers, __ATOMIC_SEQ_CST))
        return false; /* a wait counted in later looks at the set after us */
    struct reg *r = *find_reg(e, fd);
    if (!r || r->parked || r->off || r->kfd >= 0)
        return false;
    if (ready_of(r, false))
        return true;
    cp_call_enter(r->s); /* arming touches the circuit (udp.c retires) */
    cp_arm(r->s, (short)(r->events & 0xffff), true);
    cp_call_leave(r->s);
    return ready_of(r, false) != 0; /* what came before the flag went up rang nobody */
}

CP_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    cp_init();
    struct cp_sock *s = cp_fd_get(fd);
    if (!s)
        return real.epoll_ctl(epfd, op, fd, ev);
    int err;
    struct ep *e = ep_get(epfd, op == EPOLL_CTL_ADD, &err);
    if (!e) {
        cp_sock_put(s);
        return (int)cp_ret(err);
    }
    struct reg *dead = NULL;
    pthread_mutex_lock(&e->lock);
    err = ctl(e, op, fd, s, ev, &dead);
    bool wake = (err == 0 || err == 1) && op != EPOLL_CTL_DEL && wakes(e, fd);
    pthread_mutex_unlock(&e->lock);
    free_regs(dead);
    if (op != EPOLL_CTL_ADD || err) /* an added registration keeps the reference */
        cp_sock_put(s);
    else
        cp_sock_keep(s); /* a registration is no call in flight (udp.c) */
    if (err == 1) /* a parked registration came back: it holds one already */
        err = 0;
    if (wake)
        poke(e);
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
    if (state_of(r->s) == CP_FRESH) /* what the kernel says of a socket never connected */
        return (EPOLLOUT | EPOLLWRNORM | (r->s->dgram ? 0 : EPOLLHUP)) &
               (r->events | EPOLLHUP | EPOLLERR);
    cp_call_enter(r->s); /* a UDP socket's circuit stays mapped while we look (udp.c) */
    uint32_t ready = (uint16_t)cp_revents(r->s, (short)(r->events & 0xffff), ask_kernel);
    cp_call_leave(r->s);
    return ready;
}

/* What r reports now: its readiness, less what EPOLLET told already. */
static uint32_t report_of(struct reg *r, bool ask_kernel)
{
    uint32_t ready = ready_of(r, ask_kernel);
    return ready && (r->events & EPOLLET) ? edge(r, ready) : ready;
}

/* Report ready circuits; with `arm`, arm those that have nothing to report. */
static int collect(struct ep *e, struct epoll_event *out, int max, bool arm)
{
    int n = 0;
    pthread_mutex_lock(&e->lock);
    bool ask = __atomic_exchange_n(&e->hangup, false, __ATOMIC_ACQ_REL);
    for (struct reg *r = e->regs; r; r = r->next) {
        if (r->off || r->parked || state_of(r->s) == CP_LISTENING) /* the kernel's */
            continue;
        if (n >= max) { /* no room to report: just learn of vanished peers */
            if (ask)
                ready_of(r, true);
            continue;
        }
        uint32_t ready = report_of(r, ask);
        if (arm && !ready) {
            /* Armed, look again: what came before the flag went up rang nobody.
             * Armed also when ready but told already (EPOLLET: writable,
             * waiting to read), or the next ring would wake nobody.
             * Counted in as a call: arming touches the circuit (udp.c retires). */
            cp_call_enter(r->s);
            cp_arm(r->s, (short)(r->events & 0xffff), true);
            cp_call_leave(r->s);
            ready = report_of(r, false);
        }
        if (!ready)
            continue;
        out[n++] = (struct epoll_event){.events = ready, .data = r->data};
        if (r->events & EPOLLONESHOT)
            r->off = true;
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* The kernel's answer without our inner set's event: the events left. */
static int drop_ours(struct epoll_event *ev, int k)
{
    int kept = 0;
    for (int i = 0; i < k; i++)
        if (ev[i].data.u64 != INNER_DATA)
            ev[kept++] = ev[i];
    return kept;
}

/* Take our inner set's event out of the kernel's answer; harvest the inner set. */
static int drop_inner(struct ep *e, struct epoll_event *ev, int k)
{
    int kept = drop_ours(ev, k);
    bool inner = kept < k;
    struct epoll_event junk[64];
    int got = 64;
    while (inner && got == 64) {
        got = real.epoll_wait(e->inner, junk, 64, 0);
        for (int i = 0; i < got; i++) {
            if (junk[i].data.u64 == WATCH_ANSWER)
                __atomic_store_n(&e->answer, true, __ATOMIC_RELEASE);
            if (junk[i].data.u64 != WATCH_BELL)
                continue; /* a poke only wakes */
            __atomic_store_n(&e->woke, true, __ATOMIC_RELEASE);
            if (junk[i].events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP))
                __atomic_store_n(&e->hangup, true, __ATOMIC_RELEASE);
        }
    }
    return kept;
}

/* The connects whose answers came: settle them (no lock of ours held:
 * settling moves registrations, cp_epoll_follow). */
static void settle_answered(struct ep *e)
{
    if (!__atomic_exchange_n(&e->answer, false, __ATOMIC_ACQ_REL))
        return;
    pthread_mutex_lock(&e->lock);
    size_t n = 0;
    for (struct reg *r = e->regs; r; r = r->next)
        n += state_of(r->s) == CP_CONNECTING;
    struct cp_sock **socks = n ? malloc(n * sizeof(*socks)) : NULL;
    size_t k = 0;
    for (struct reg *r = e->regs; r && socks && k < n; r = r->next) {
        if (state_of(r->s) == CP_CONNECTING) {
            cp_sock_hold(r->s);
            socks[k++] = r->s;
        }
    }
    pthread_mutex_unlock(&e->lock);
    if (n && !socks)
        __atomic_store_n(&e->answer, true, __ATOMIC_RELEASE); /* out of memory: next time */
    for (size_t i = 0; i < k; i++) {
        cp_connect_settle(socks[i], false);
        cp_sock_release(socks[i]);
    }
    free(socks);
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
    bool again = false;
    for (int empty = 0;; empty++) {
        settle_answered(e);
        int n = collect(e, ev, max, false);
        bool wait = n == 0 && cp_ms_until(deadline) != 0;
        bool rings = __atomic_load_n(&e->rings, __ATOMIC_RELAXED) > 0;
        if (wait && !empty && rings && cp_spin(any_ready, &look, deadline)) /* before a sleep */
            n = look.n, wait = false;
        bool counted = wait; /* in before the last look: what epoll_ctl adds or
                              * changes after it pokes the set */
        if (counted) {
            __atomic_add_fetch(&e->sleepers, 1, __ATOMIC_SEQ_CST);
            wait = (n = collect(e, ev, max, true)) == 0;
        }
        int k = n < max ? real.epoll_pwait(e->epfd, ev + n, max - n,
                                           wait ? cp_ms_until(deadline) : 0, mask) : 0;
        int err = errno;
        if (counted)
            __atomic_sub_fetch(&e->sleepers, 1, __ATOMIC_SEQ_CST);
        if (k < 0)
            return n ? n : -err;
        n += drop_inner(e, ev + n, k);
        bool woke = __atomic_exchange_n(&e->woke, false, __ATOMIC_ACQ_REL);
        if (woke && !n)
            free_regs(drop_parked(e)); /* a parked doorbell rang for nothing */
        if (!n && !again && __atomic_load_n(&e->answer, __ATOMIC_ACQUIRE)) {
            again = true; /* an answer came: settle it and look once more, waiting or not */
            continue;
        }
        if (n || !wait || cp_ms_until(deadline) == 0)
            return n;
        if (empty >= EMPTY_WAKES_BEFORE_NAP)
            usleep(1000); /* rings we cannot drain (another thread sleeps on them) */
    }
}

/*
 * The kernel answered a wait on a set we had no record of when it began (k:
 * its answer).  Another thread may have added a circuit socket since, which
 * put our inner set in the program's: its event is ours, never the
 * program's.  If nothing else came, wait on as for a set of circuits.
 */
static int passed_through(int epfd, struct epoll_event *ev, int max, int k, int64_t deadline,
                          const sigset_t *mask)
{
    int kept = k > 0 ? drop_ours(ev, k) : k;
    if (kept != 0 || k == 0)
        return kept;
    int err;
    struct ep *e = ep_get(epfd, false, &err);
    if (!e) /* the set was closed under us */
        return 0;
    int rc = wait_loop(e, ev, max, deadline, mask);
    ep_put(e);
    return (int)cp_ret(rc);
}

CP_EXPORT int epoll_pwait(int epfd, struct epoll_event *ev, int max, int timeout,
                          const sigset_t *mask)
{
    cp_init();
    int err;
    int64_t deadline = timeout < 0 ? -1 : cp_now_ns() + (int64_t)timeout * 1000000LL;
    struct ep *e = max > 0 && ev ? ep_get(epfd, false, &err) : NULL;
    if (!e)
        return passed_through(epfd, ev, max, real.epoll_pwait(epfd, ev, max, timeout, mask),
                              deadline, mask);
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
    int64_t deadline = ts ? cp_now_ns() + (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec : -1;
    struct ep *e = max > 0 && ev ? ep_get(epfd, false, &err) : NULL;
    if (!e) {
        if (!real.epoll_pwait2)
            return (int)cp_ret(-ENOSYS);
        return passed_through(epfd, ev, max, real.epoll_pwait2(epfd, ev, max, ts, mask),
                              deadline, mask);
    }
    if (ts && (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000L)) {
        ep_put(e);
        return (int)cp_ret(-EINVAL);
    }
    int rc = wait_loop(e, ev, max, deadline, mask);
    ep_put(e);
    return (int)cp_ret(rc);
}

CP_EXPORT int epoll_wait(int epfd, struct epoll_event *ev, int max, int timeout)
{
    return epoll_pwait(epfd, ev, max, timeout, NULL);
}
