/*
 * test_wakeup_race.c - two threads of one endpoint about to sleep on one
 * doorbell must not lose each other's wakeups, whatever the interleaving.
 *
 * The schedule that once lost one is forced here by interposing recv() and
 * poll() (the core is linked into this program, so its calls land on ours;
 * the core drains its doorbell with recv(bell, ..., MSG_DONTWAIT), and
 * sleeps with poll() on {bell, peer_bell}):
 *
 *   A (receiver) counts itself in as the only sleeper and is held just
 *     before it drains the doorbell (recv);
 *   B (sender on a full ring) counts itself in second, raises its flag,
 *     finds no room and is held just before it sleeps (poll);
 *   the peer makes room and rings the doorbell for B;
 *   A drains: B's ring is gone; B sleeps on a silent doorbell for ever.
 *
 * With the fix (wait.c: counting in and draining are one step, under
 * bell_lock), B cannot count in during A's drain: it waits on bell_lock,
 * then raises its flag and looks at the ring after the drain, finds the
 * room and sends.  The test holds whichever point each thread reaches and
 * requires B to finish.
 *
 * Why it still catches the bug: revert the fix (count in with a bare
 * atomic add, drain outside the lock) and the schedule above happens
 * exactly: A is held inside its drain's recv() with waiters == 1; B counts
 * in as sleeper 2 (so it does not drain), stores prod_wait = 1, finds no
 * room and is held at its poll(); the peer's receive sees prod_wait, takes
 * it down and rings; A's held recv() then eats that one byte; B's poll()
 * sleeps on an empty doorbell, nothing rings again (A's drain raised only
 * cons_wait, tx_need is 0 for a blocking send), and the 3 s bound below
 * fails the test.  (Checked by building this test against a copy of wait.c
 * without the lock.)
 *
 * A second test forces the close-while-sleeping interleaving: close only
 * marks the endpoint closed and wakes the sleeper; the fds are closed by
 * the last call to leave, so the sleeper never polls a reused number.
 */
#include "harness.h"

#include <pthread.h>
#include <sys/syscall.h>

#define RING 4096u

static int hook_fd = -1;                 /* the doorbell under test */
static __thread int hold_recv, hold_poll; /* one-shot, per thread */
static int recv_held, recv_go, poll_held, poll_go;

static void hold(int *held, int *go)
{
    __atomic_store_n(held, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(go, __ATOMIC_ACQUIRE))
        sleep_ms(1);
}

static int reached(int *flag, int ms)
{
    for (int i = 0; i < ms; i++) {
        if (__atomic_load_n(flag, __ATOMIC_ACQUIRE))
            return 1;
        sleep_ms(1);
    }
    return __atomic_load_n(flag, __ATOMIC_ACQUIRE);
}

ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    if (hold_recv && fd == hook_fd) {
        hold_recv = 0;
        hold(&recv_held, &recv_go);
    }
    return syscall(SYS_recvfrom, fd, buf, n, flags, NULL, NULL);
}

/* glibc declares poll's array write-only; it is read, as the kernel does. */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    if (hold_poll && n >= 1 && fds[0].fd == hook_fd) {
        hold_poll = 0;
        hold(&poll_held, &poll_go);
    }
    struct timespec ts = {timeout / 1000, (long)(timeout % 1000) * 1000000L};
    return (int)syscall(SYS_ppoll, fds, n, timeout < 0 ? NULL : &ts, NULL, 0);
}

struct worker {
    struct circuit *c;
    int send;
    ssize_t rc;
    int done;
    pthread_t thread;
};

static void *receiver(void *arg)
{
    struct worker *w = arg;
    char buf[16];
    hold_recv = 1;
    w->rc = circuit_recv(w->c, buf, sizeof(buf), 0, CIRCUIT_FOREVER);
    __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void *sender(void *arg)
{
    struct worker *w = arg;
    hold_poll = 1;
    w->rc = circuit_send(w->c, "x", 1, 0, CIRCUIT_FOREVER);
    __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void test_drain_race(void)
{
    static uint8_t buf[RING];
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    circuit_set_spin(pr.c[0], 0);
    circuit_set_spin(pr.c[1], 0);
    CHECK_EQ(circuit_send(pr.c[0], buf, RING, 0, CIRCUIT_FOREVER), RING);
    hook_fd = circuit_bell(pr.c[0]);

    struct worker a = {.c = pr.c[0]}, b = {.c = pr.c[0], .send = 1};
    CHECK(pthread_create(&a.thread, NULL, receiver, &a) == 0);
    CHECK(reached(&recv_held, 5000)); /* A: counted in, about to drain */
    CHECK(pthread_create(&b.thread, NULL, sender, &b) == 0);
    /* B either reaches its sleep (counted in beside A) or is kept out
     * until A's drain is over; give it time to get as far as it can. */
    reached(&poll_held, 300);
    CHECK(!__atomic_load_n(&b.done, __ATOMIC_ACQUIRE));

    /* The peer makes room: the ring for B. */
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), RING);
    __atomic_store_n(&recv_go, 1, __ATOMIC_RELEASE); /* A drains */
    sleep_ms(50);
    __atomic_store_n(&poll_go, 1, __ATOMIC_RELEASE); /* B sleeps, if it got there */

    /* B must wake and send; nothing else will ring for it. */
    if (!reached(&b.done, 3000)) {
        fprintf(stderr, "sender slept through the ring that made room: lost wakeup\n");
        CHECK(!"lost wakeup");
    }
    CHECK(pthread_join(b.thread, NULL) == 0);
    CHECK_EQ(b.rc, 1);
    CHECK(!__atomic_load_n(&a.done, __ATOMIC_ACQUIRE));
    /* A still sleeps, correctly; data wakes it. */
    CHECK_EQ(circuit_send(pr.c[1], "a", 1, 0, CIRCUIT_FOREVER), 1);
    CHECK(pthread_join(a.thread, NULL) == 0);
    CHECK_EQ(a.rc, 1);
    hook_fd = -1;
    pair_close(&pr);
    OK("two_sleepers_drain_race");
}

/* --- Close while a thread sleeps in recv. --- */

static ino_t inode_of(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

struct closing {
    struct circuit *c;
    int at_drain; /* hold it in its drain (recv) rather than at its poll */
    ssize_t rc;
    int done;
};

static void *closing_sleeper(void *arg)
{
    struct closing *w = arg;
    char buf[16];
    hold_recv = w->at_drain;
    hold_poll = !w->at_drain;
    w->rc = circuit_recv(w->c, buf, sizeof(buf), 0, CIRCUIT_FOREVER);
    __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/*
 * close marks the endpoint closed and rings it; the sleeper wakes with
 * -EBADF, and the fds are closed by the last call to leave, so until the
 * sleeper has left, its bell (and the others) keep their numbers: a new fd
 * cannot take them, and the sleeper never polls or rings a stranger's fd.
 * The sleeper is held inside the call (at its poll, or inside its drain,
 * where it eats close's ring and must still see the close).
 */
static void test_close_while_sleeping(int at_drain)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    circuit_set_spin(pr.c[0], 0);
    const int old[3] = {pr.bell[0], pr.self_bell[0], pr.peer_bell[0]};
    ino_t ino[3];
    for (int i = 0; i < 3; i++)
        CHECK((ino[i] = inode_of(old[i])) != 0);
    hook_fd = pr.bell[0];
    recv_held = recv_go = poll_held = poll_go = 0;
    struct closing w = {.c = pr.c[0], .at_drain = at_drain};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, closing_sleeper, &w) == 0);
    CHECK(reached(at_drain ? &recv_held : &poll_held, 5000));

    CHECK_EQ(circuit_close(pr.c[0]), 0);
    CHECK_EQ(circuit_bell(pr.c[0]), -1);
    /* New calls are refused at once... */
    char buf[16];
    CHECK_EQ(circuit_recv(pr.c[0], buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EBADF);
    CHECK_EQ(circuit_close(pr.c[0]), -EBADF);
    /* ...the peer sees the close... */
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    /* ...but the fds stay open while the sleeper is inside. */
    for (int i = 0; i < 3; i++) {
        CHECK(fcntl(old[i], F_GETFD) >= 0);
        CHECK_EQ(inode_of(old[i]), ino[i]);
    }
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    for (int i = 0; i < 3; i++)
        CHECK(sv[0] != old[i] && sv[1] != old[i]);
    close(sv[0]);
    close(sv[1]);
    CHECK(!__atomic_load_n(&w.done, __ATOMIC_ACQUIRE));

    /* Let it go: it wakes (close rang its bell), and leaves with EBADF. */
    __atomic_store_n(at_drain ? &recv_go : &poll_go, 1, __ATOMIC_RELEASE);
    if (!reached(&w.done, 3000)) {
        fprintf(stderr, "sleeper slept through the close of its endpoint\n");
        CHECK(!"close did not wake the sleeper");
    }
    CHECK(pthread_join(t, NULL) == 0);
    CHECK_EQ(w.rc, -EBADF);
    /* The last one out closed them: each number is closed, or (not here,
     * nothing opens fds meanwhile, but allowed) reused by another file. */
    for (int i = 0; i < 3; i++) {
        errno = 0;
        CHECK((fcntl(old[i], F_GETFD) < 0 && errno == EBADF) || inode_of(old[i]) != ino[i]);
    }
    hook_fd = -1;
    pair_close(&pr);
    OK(at_drain ? "close_while_draining_fds_outlive_call" : "close_while_sleeping_fds_outlive_call");
}

int main(void)
{
    alarm(30);
    for (int i = 0; i < 3; i++) {
        recv_held = recv_go = poll_held = poll_go = 0;
        test_drain_race();
    }
    test_close_while_sleeping(0);
    test_close_while_sleeping(1);
    return 0;
}
