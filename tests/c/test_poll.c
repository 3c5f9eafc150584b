/*
 * test_poll.c - readiness for poll-style callers: circuit_poll's masks in
 * every state of a conversation, and circuit_arm_read making the doorbell
 * (the socket end poll-style callers watch) readable exactly when there is
 * something to do.
 */
#include "harness.h"

#include <pthread.h>

#define RING 4096u
#define R CIRCUIT_READABLE
#define W CIRCUIT_WRITABLE
#define H CIRCUIT_HANGUP

static void test_masks(void)
{
    static uint8_t buf[RING];
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        const int dgram = kind == CIRCUIT_DGRAM;
        struct pair pr;
        pair_open(&pr, kind, RING, RING);
        struct circuit *a = pr.c[0], *b = pr.c[1];
        CHECK_EQ(circuit_poll(a), W);
        CHECK_EQ(circuit_poll(b), W);

        /* Readable while data waits. */
        CHECK_EQ(circuit_send(b, "data", 4, 0, CIRCUIT_FOREVER), 4);
        CHECK_EQ(circuit_poll(a), R | W);
        CHECK_EQ(circuit_poll(b), W);
        CHECK_EQ(circuit_recv(a, buf, 2, 0, CIRCUIT_FOREVER), dgram ? 4 : 2);
        if (!dgram) {
            CHECK_EQ(circuit_poll(a), R | W);
            CHECK_EQ(circuit_recv(a, buf, 2, 0, CIRCUIT_FOREVER), 2);
        }
        CHECK_EQ(circuit_poll(a), W);

        /* Writable while a send would not wait. */
        size_t chunk = dgram ? RING - 16 : RING - 1; /* leaves 8 and 1 bytes */
        CHECK_EQ(circuit_send(a, buf, chunk, 0, CIRCUIT_FOREVER), chunk);
        if (dgram) {
            CHECK_EQ(circuit_poll(a), 0); /* 8 bytes: room for no datagram */
            CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), chunk);
            CHECK_EQ(circuit_poll(a), W);
            CHECK_EQ(circuit_send(a, buf, RING - 8, 0, CIRCUIT_FOREVER), RING - 8);
        } else {
            CHECK_EQ(circuit_poll(a), W); /* one byte still fits */
            CHECK_EQ(circuit_send(a, buf, 1, 0, CIRCUIT_FOREVER), 1);
        }
        CHECK_EQ(circuit_poll(a), 0);
        CHECK_EQ(circuit_poll(b), R | W);
        CHECK_EQ(circuit_recv(b, buf, dgram ? sizeof(buf) : 1, 0, CIRCUIT_FOREVER),
                 dgram ? RING - 8 : 1);
        CHECK_EQ(circuit_poll(a), W);
        CHECK_EQ(circuit_recv(b, buf, sizeof(buf), CIRCUIT_ALL | CIRCUIT_NONBLOCK,
                              CIRCUIT_FOREVER), dgram ? -EAGAIN : (int)RING - 1);

        /* End of data is readable; a shut-down writer is not hung up. */
        CHECK_EQ(circuit_send(b, "tail", 4, 0, CIRCUIT_FOREVER), 4);
        CHECK_EQ(circuit_shutdown_write(b), 0);
        CHECK_EQ(circuit_poll(a), R | W);
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 4);
        CHECK_EQ(circuit_poll(a), R | W); /* recv would return -ESHUTDOWN at once */
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
        /* Our own shutdown: a send would fail at once, so it is "writable". */
        CHECK_EQ(circuit_poll(b), W);
        CHECK_EQ(circuit_send(b, "x", 1, 0, CIRCUIT_FOREVER), -EPIPE);

        /* Close: hang-up on the other side, everything ready. */
        CHECK_EQ(circuit_close(b), 0);
        CHECK_EQ(circuit_poll(a), R | W | H);
        CHECK_EQ(circuit_poll(b), R | W | H); /* closed endpoint */
        pair_close(&pr);
    }
    OK("poll_masks");
}

static void test_masks_on_reset(void)
{
    /* Abort. */
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    CHECK_EQ(circuit_abort(pr.c[1]), 0);
    CHECK_EQ(circuit_poll(pr.c[0]), R | W | H);
    pair_close(&pr);
    /* Death: the hang-up of our peer_bell, and nothing else, tells. */
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    CHECK_EQ(circuit_poll(pr.c[0]), W);
    pair_vanish(&pr, 1);
    CHECK_EQ(circuit_poll(pr.c[0]), R | W | H);
    pair_close(&pr);
    /* Death with data still in the ring: the data is readable either way. */
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    CHECK_EQ(circuit_send(pr.c[1], "x", 1, 0, CIRCUIT_FOREVER), 1);
    pair_vanish(&pr, 1);
    CHECK_EQ(circuit_poll(pr.c[0]), R | W | H);
    char buf[8];
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ECONNRESET);
    pair_close(&pr);
    OK("poll_masks_on_reset");
}

struct later {
    struct circuit *c;
    int delay_ms;
    int what; /* 0: send data, 1: shut down, 2: receive (make room) */
};

static void *later_main(void *arg)
{
    struct later *l = arg;
    sleep_ms(l->delay_ms);
    static uint8_t buf[RING];
    if (l->what == 0)
        CHECK_EQ(circuit_send(l->c, "late", 4, 0, CIRCUIT_FOREVER), 4);
    else if (l->what == 1)
        CHECK_EQ(circuit_shutdown_write(l->c), 0);
    else
        CHECK(circuit_recv(l->c, buf, sizeof(buf), 0, CIRCUIT_FOREVER) > 0);
    return NULL;
}

/* poll() on the doorbell until readable; the time it took, or -1. */
static int64_t wait_bell(int fd, int timeout_ms)
{
    int64_t t0 = now_ns();
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = poll(&p, 1, timeout_ms);
    CHECK(n >= 0);
    return n == 1 && (p.revents & POLLIN) ? now_ns() - t0 : -1;
}

static void test_arm_read(void)
{
    static uint8_t buf[RING];
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        struct pair pr;
        pair_open(&pr, kind, RING, RING);
        struct circuit *a = pr.c[0], *b = pr.c[1];
        const int bell = circuit_bell(a);

        /* Nothing there: the doorbell is quiet after arming. */
        CHECK_EQ(circuit_arm_read(a), 0);
        CHECK(!fd_readable(bell));

        /* Data already there, its ring eaten by someone: arming restores it. */
        CHECK_EQ(circuit_send(b, "now", 3, 0, CIRCUIT_FOREVER), 3);
        CHECK(fd_readable(bell));
        bell_take(bell);
        CHECK(!fd_readable(bell));
        CHECK_EQ(circuit_arm_read(a), R);
        CHECK(fd_readable(bell));
        CHECK_EQ(circuit_arm_read(a), R); /* and again: still the truth */
        CHECK(fd_readable(bell));

        /* Consumed: arming drains the doorbell. */
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 3);
        CHECK_EQ(circuit_arm_read(a), 0);
        CHECK(!fd_readable(bell));

        /* Data arriving later rings the armed doorbell. */
        CHECK_EQ(circuit_send(b, "x", 1, 0, CIRCUIT_FOREVER), 1);
        CHECK(fd_readable(bell));
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1);
        CHECK_EQ(circuit_arm_read(a), 0);
        CHECK(!fd_readable(bell));
        struct later l = {b, 50, 0};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, later_main, &l) == 0);
        int64_t took = wait_bell(bell, 5000);
        CHECK(took >= 0);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 4);
        CHECK(memcmp(buf, "late", 4) == 0);

        /* Without arming, a consumer that is awake is not rung. */
        CHECK_EQ(circuit_send(b, "y", 1, 0, CIRCUIT_FOREVER), 1);
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1);
        bell_take(bell);
        CHECK_EQ(circuit_send(b, "z", 1, 0, CIRCUIT_FOREVER), 1);
        CHECK(!fd_readable(bell));
        CHECK_EQ(circuit_arm_read(a), R);
        CHECK(fd_readable(bell));
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1);

        /* Room for a blocked sender rings the armed doorbell too.  (Records
         * of 120 bytes tile the ring: no room is left for any datagram.) */
        ssize_t rc;
        while ((rc = circuit_send(a, buf, 120, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER)) > 0)
            ;
        CHECK_EQ(rc, -EAGAIN);
        CHECK_EQ(circuit_arm_read(a), 0);
        CHECK(!fd_readable(bell));
        l = (struct later){b, 30, 2};
        CHECK(pthread_create(&t, NULL, later_main, &l) == 0);
        CHECK(wait_bell(bell, 5000) >= 0);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK(circuit_poll(a) & W);
        CHECK(circuit_send(a, buf, 100, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER) > 0);
        while (circuit_recv(b, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER) > 0)
            ;

        /* The end arriving later rings it as well, and stays readable. */
        CHECK_EQ(circuit_arm_read(a), 0);
        CHECK(!fd_readable(bell));
        l = (struct later){b, 30, 1};
        CHECK(pthread_create(&t, NULL, later_main, &l) == 0);
        CHECK(wait_bell(bell, 5000) >= 0);
        CHECK(pthread_join(t, NULL) == 0);
        bell_take(bell);
        CHECK_EQ(circuit_arm_read(a), R);
        CHECK(fd_readable(bell));
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
        pair_close(&pr);
    }

    /* A peer's death is found by arming (peer_bell's hang-up), and told by
     * the bell. */
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    const int bell = circuit_bell(pr.c[0]);
    CHECK_EQ(circuit_arm_read(pr.c[0]), 0);
    CHECK(!fd_readable(bell));
    pair_vanish(&pr, 1);
    CHECK_EQ(circuit_arm_read(pr.c[0]), R);
    CHECK(fd_readable(bell));
    pair_close(&pr);
    OK("arm_read_doorbell");
}

/* --- Pollers and the threads that drain their doorbell. --- */

struct blocked {
    struct circuit *c;
    const void *buf;
    size_t len;
    int recv; /* 0: blocking send, 1: blocking recv */
    pid_t tid;
    ssize_t rc;
    pthread_t thread;
};

static void *blocked_main(void *arg)
{
    struct blocked *b = arg;
    static uint8_t in[RING];
    __atomic_store_n(&b->tid, gettid(), __ATOMIC_RELEASE);
    b->rc = b->recv ? circuit_recv(b->c, in, sizeof(in), 0, CIRCUIT_FOREVER)
                    : circuit_send(b->c, b->buf, b->len, 0, CIRCUIT_FOREVER);
    return NULL;
}

/* CPU time a thread of ours has used, in ms. */
static int64_t cpu_ms(pthread_t t)
{
    clockid_t id;
    struct timespec ts;
    CHECK(pthread_getcpuclockid(t, &id) == 0);
    CHECK(clock_gettime(id, &ts) == 0);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void start_blocked(struct blocked *b)
{
    b->tid = 0;
    CHECK(pthread_create(&b->thread, NULL, blocked_main, b) == 0);
    while (!__atomic_load_n(&b->tid, __ATOMIC_ACQUIRE))
        sleep_ms(1);
    wait_sleeping(b->tid);
}

/*
 * The review bug "pollers miss data": a call that drains our doorbell for
 * its own direction must not strand a poller of the other.  Here the drain
 * comes from a refused non-blocking send: the rings it ate may have been a
 * poller's, so it raises cons_wait, and the next data rings again.
 */
static void test_nonblock_send_keeps_poller(void)
{
    static uint8_t buf[RING];
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        struct pair pr;
        pair_open(&pr, kind, RING, RING);
        struct circuit *a = pr.c[0], *b = pr.c[1];
        uint8_t *m = raw_map(&pr);
        const int bell = circuit_bell(a);
        /* A consumer that was rung and is awake: its flag is down and a
         * stale ring waits in the doorbell. */
        CHECK_EQ(circuit_send(b, "d1", 2, 0, CIRCUIT_FOREVER), 2);
        CHECK_EQ(raw_dir(m, 1)->cons_wait, 0);
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 2);
        CHECK(fd_readable(bell));
        /* A's tx ring full: a non-blocking send is refused, and drains. */
        size_t fill = kind == CIRCUIT_DGRAM ? RING - 8 : RING;
        CHECK_EQ(circuit_send(a, buf, fill, 0, CIRCUIT_FOREVER), fill);
        CHECK_EQ(circuit_send(a, buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
        CHECK_EQ(bell_count(bell), 0);
        CHECK_EQ(raw_dir(m, 1)->cons_wait, 1); /* raised by the drain */
        /* Data arrives: the poller must see it. */
        CHECK_EQ(circuit_send(b, "d2", 2, 0, CIRCUIT_FOREVER), 2);
        CHECK(wait_bell(bell, 1000) >= 0);
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 2);
        CHECK(memcmp(buf, "d2", 2) == 0);
        raw_unmap(&pr, m);
        pair_close(&pr);
    }
    OK("nonblock_send_drain_keeps_poller");
}

/*
 * The same with a thread asleep in a blocking send while data arrives for
 * a poller of the same endpoint: the data's ring wakes the sender, which
 * has no room yet and goes back to sleep; whatever it drains on its way,
 * the doorbell must stay readable for the poller while the data waits.
 * And the mirror case: a thread asleep in a blocking recv while room
 * arrives for a poller whose non-blocking send was refused.
 */
static void test_blocked_thread_keeps_poller(void)
{
    static uint8_t buf[RING];
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        const int dgram = kind == CIRCUIT_DGRAM;
        struct pair pr;
        pair_open(&pr, kind, RING, RING);
        circuit_set_spin(pr.c[0], 0);
        circuit_set_spin(pr.c[1], 0);
        struct circuit *a = pr.c[0], *b = pr.c[1];
        const int bell = circuit_bell(a);
        size_t fill = dgram ? RING - 8 : RING;
        CHECK_EQ(circuit_send(a, buf, fill, 0, CIRCUIT_FOREVER), fill);
        CHECK_EQ(circuit_arm_read(a), 0);
        CHECK(!fd_readable(bell));
        struct blocked s = {.c = a, .buf = "s", .len = 1};
        start_blocked(&s);
        CHECK(!fd_readable(bell));
        CHECK_EQ(circuit_send(b, "data", 4, 0, CIRCUIT_FOREVER), 4);
        /* The sender wakes on that ring, finds no room, sleeps again; the
         * doorbell stays readable for the poller, and the sender does not
         * spin on it meanwhile. */
        if (!asleep_within(s.tid, 3000))
            CHECK(!"the blocked sender spins on the doorbell kept readable for the poller");
        int64_t cpu0 = cpu_ms(s.thread);
        CHECK(wait_bell(bell, 1000) >= 0);
        CHECK_EQ(circuit_poll(a) & R, R);
        sleep_ms(200);
        CHECK(fd_readable(bell));
        CHECK(cpu_ms(s.thread) - cpu0 < 50);
        /* Asleep, not spinning (the CPU time says so); its bounded epoll
         * slices wake it briefly, so look for sleep, not at one instant. */
        CHECK(asleep_within(s.tid, 1000));
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 4);
        CHECK(memcmp(buf, "data", 4) == 0);
        /* Consumed: the poller's next call finds nothing and the doorbell
         * turns quiet (no busy poller) while the sender still sleeps. */
        CHECK_EQ(circuit_recv(a, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
        CHECK(wait_bell(bell, 100) < 0);
        CHECK(asleep_within(s.tid, 1000));
        /* Room ends the sender's wait. */
        CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), fill);
        CHECK(pthread_join(s.thread, NULL) == 0);
        CHECK_EQ(s.rc, 1);
        CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1);

        /* Mirror: a poller's refused send, a thread asleep in recv. */
        CHECK_EQ(circuit_send(a, buf, fill, 0, CIRCUIT_FOREVER), fill);
        CHECK_EQ(circuit_send(a, buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
        CHECK(!fd_readable(bell));
        struct blocked r = {.c = a, .recv = 1};
        start_blocked(&r);
        CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), fill);
        /* The receiver wakes on the room's ring, finds no data, sleeps. */
        if (!asleep_within(r.tid, 3000))
            CHECK(!"the blocked receiver spins on the doorbell kept readable for the poller");
        cpu0 = cpu_ms(r.thread);
        CHECK(wait_bell(bell, 1000) >= 0);
        CHECK(circuit_poll(a) & W);
        sleep_ms(200);
        CHECK(fd_readable(bell));
        CHECK(cpu_ms(r.thread) - cpu0 < 50);
        CHECK(asleep_within(r.tid, 1000));
        CHECK_EQ(circuit_send(a, "x", 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 1);
        CHECK_EQ(circuit_send(b, "y", 1, 0, CIRCUIT_FOREVER), 1);
        CHECK(pthread_join(r.thread, NULL) == 0);
        CHECK_EQ(r.rc, 1);
        pair_close(&pr);
    }
    OK("blocked_thread_keeps_poller");
}

/*
 * Two threads asleep in the library (a receiver, and a sender waiting for
 * more room than there is) after a poller's send was refused.  The blocking
 * send supersedes the refused one (tx_need belongs to the last send tried),
 * so the room that is there wakes nobody, and both sleep: neither may keep
 * waking the other.
 */
static void test_two_sleepers_and_poller_work(void)
{
    static uint8_t buf[RING];
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    circuit_set_spin(pr.c[0], 0);
    circuit_set_spin(pr.c[1], 0);
    struct circuit *a = pr.c[0], *b = pr.c[1];
    CHECK_EQ(circuit_send(a, buf, 1000, 0, CIRCUIT_FOREVER), 1000); /* record 1008 */
    CHECK_EQ(circuit_send(a, buf, 1992, 0, CIRCUIT_FOREVER), 1992); /* record 2000 */
    CHECK_EQ(circuit_send(a, buf, 1500, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1000);
    /* 2096 bytes free: room for the poller's 1508-byte record, not 3008. */
    struct blocked s = {.c = a, .buf = buf, .len = 3000};
    struct blocked r = {.c = a, .recv = 1};
    start_blocked(&s);
    start_blocked(&r);
    int64_t cs = cpu_ms(s.thread), cr = cpu_ms(r.thread);
    sleep_ms(200);
    CHECK(cpu_ms(s.thread) - cs < 50);
    CHECK(cpu_ms(r.thread) - cr < 50);
    CHECK(asleep_within(s.tid, 1000));
    CHECK(asleep_within(r.tid, 1000));
    CHECK(circuit_poll(a) & W);
    /* Each is woken by its own event. */
    CHECK_EQ(circuit_send(b, "hi", 2, 0, CIRCUIT_FOREVER), 2);
    CHECK(pthread_join(r.thread, NULL) == 0);
    CHECK_EQ(r.rc, 2);
    CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1992);
    CHECK(pthread_join(s.thread, NULL) == 0);
    CHECK_EQ(s.rc, 3000);
    CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 3000);
    pair_close(&pr);
    OK("two_sleepers_and_poller_work_stay_asleep");
}

/*
 * tx_need: a refused non-blocking send of a big datagram waits for room for
 * its record, not for any room.  Its poller is not woken while the ring has
 * less than that (no busy wake-ups on a few free bytes), and is woken as
 * soon as there is enough.
 */
static void test_tx_need(void)
{
    static uint8_t buf[RING];
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    struct circuit *a = pr.c[0], *b = pr.c[1];
    const int bell = circuit_bell(a);
    /* Records of 16 and 2992 bytes: 1088 bytes stay free. */
    CHECK_EQ(circuit_send(a, buf, 8, 0, CIRCUIT_FOREVER), 8);
    CHECK_EQ(circuit_send(a, buf, 2984, 0, CIRCUIT_FOREVER), 2984);
    CHECK_EQ(circuit_bytes_sent(a), RING - 1088);
    CHECK_EQ(circuit_arm_read(a), 0);
    bell_take(bell);
    CHECK(circuit_poll(a) & W); /* some datagram fits... */
    CHECK_EQ(circuit_send(a, buf, 2000, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    /* ...but not this one: no wake-up for it. */
    CHECK(wait_bell(bell, 100) < 0);
    CHECK_EQ(circuit_arm_read(a), 0);
    CHECK(wait_bell(bell, 50) < 0);
    /* The consumer frees 16 bytes: 1104 free, still short of 2008.  Its
     * release may ring once (the flag is a hint); after the poller's retry
     * the doorbell is quiet again. */
    CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 8);
    CHECK_EQ(circuit_send(a, buf, 2000, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK(wait_bell(bell, 100) < 0);
    /* A reservation waits for its record the same way. */
    void *p;
    CHECK_EQ(circuit_reserve(a, 1500, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &p), -EAGAIN);
    CHECK(wait_bell(bell, 100) < 0);
    CHECK_EQ(circuit_send(a, buf, 2000, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    /* Enough room: the doorbell turns readable, and stays so. */
    CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 2984);
    CHECK(wait_bell(bell, 1000) >= 0);
    CHECK_EQ(circuit_arm_read(a), 0); /* nothing to read, but... */
    CHECK(fd_readable(bell));          /* ...room for the refused send */
    CHECK_EQ(circuit_send(a, buf, 2000, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 2000);
    /* Sent: nobody waits for room any more; arming quiets the doorbell. */
    CHECK_EQ(circuit_arm_read(a), 0);
    CHECK(!fd_readable(bell));
    pair_close(&pr);

    /* A poller's refused send is not woken by less room than it needs even
     * when the thread that drains is another one: the arm keeps tx_need. */
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    a = pr.c[0];
    b = pr.c[1];
    CHECK_EQ(circuit_send(a, buf, 3000, 0, CIRCUIT_FOREVER), 3000);
    CHECK_EQ(circuit_send(a, buf, 2000, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(circuit_recv(a, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK(wait_bell(circuit_bell(a), 100) < 0);
    CHECK_EQ(circuit_recv(b, buf, sizeof(buf), 0, CIRCUIT_FOREVER), 3000);
    CHECK(wait_bell(circuit_bell(a), 1000) >= 0);
    CHECK_EQ(circuit_recv(a, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK(fd_readable(circuit_bell(a))); /* restored: the room is still there */
    pair_close(&pr);
    OK("tx_need_wakes_only_for_enough_room");
}

int main(void)
{
    alarm(30);
    test_masks();
    test_masks_on_reset();
    test_arm_read();
    test_nonblock_send_keeps_poller();
    test_blocked_thread_keeps_poller();
    test_two_sleepers_and_poller_work();
    test_tx_need();
    return 0;
}
