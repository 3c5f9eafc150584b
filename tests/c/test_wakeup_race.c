/*
 * test_wakeup_race.c - two threads of one endpoint about to sleep on one
 * doorbell must not lose each other's wakeups, whatever the interleaving.
 *
 * The schedule that once lost one is forced here by interposing read() and
 * poll() (the core is linked into this program, so its calls land on ours):
 *
 *   A (receiver) counts itself in as the only sleeper and is held just
 *     before it drains the doorbell (read);
 *   B (sender on a full ring) counts itself in second, raises its flag,
 *     finds no room and is held just before it sleeps (poll);
 *   the peer makes room and rings the doorbell for B;
 *   A drains: B's ring is gone; B sleeps on a silent doorbell for ever.
 *
 * With the fix, counting in and draining are one step, so B cannot count
 * in during A's drain: it waits, then looks at the ring after it.  The test
 * holds whichever point each thread reaches and requires B to finish.
 */
#include "harness.h"

#include <pthread.h>
#include <sys/syscall.h>

#define RING 4096u

static int hook_fd = -1;                 /* the doorbell under test */
static __thread int hold_read, hold_poll; /* one-shot, per thread */
static int read_held, read_go, poll_held, poll_go;

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

ssize_t read(int fd, void *buf, size_t n)
{
    if (hold_read && fd == hook_fd) {
        hold_read = 0;
        hold(&read_held, &read_go);
    }
    return syscall(SYS_read, fd, buf, n);
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
    hold_read = 1;
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
    pair_open(&pr, CIRCUIT_STREAM, RING, RING, 0);
    circuit_set_spin(pr.c[0], 0);
    circuit_set_spin(pr.c[1], 0);
    CHECK_EQ(circuit_send(pr.c[0], buf, RING, 0, CIRCUIT_FOREVER), RING);
    hook_fd = circuit_bell(pr.c[0]);

    struct worker a = {.c = pr.c[0]}, b = {.c = pr.c[0], .send = 1};
    CHECK(pthread_create(&a.thread, NULL, receiver, &a) == 0);
    CHECK(reached(&read_held, 5000)); /* A: counted in, about to drain */
    CHECK(pthread_create(&b.thread, NULL, sender, &b) == 0);
    /* B either reaches its sleep (counted in beside A) or is kept out
     * until A's drain is over; give it time to get as far as it can. */
    reached(&poll_held, 300);
    CHECK(!__atomic_load_n(&b.done, __ATOMIC_ACQUIRE));

    /* The peer makes room: the ring for B. */
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), RING);
    __atomic_store_n(&read_go, 1, __ATOMIC_RELEASE); /* A drains */
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

int main(void)
{
    alarm(30);
    for (int i = 0; i < 3; i++) {
        read_held = read_go = poll_held = poll_go = 0;
        test_drain_race();
    }
    return 0;
}
