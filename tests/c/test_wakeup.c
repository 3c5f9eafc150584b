/*
 * test_wakeup.c - sleeping and waking across threads: a receiver asleep on
 * its doorbell is woken by data, a sender asleep on a full ring by room, a
 * sleeper by the peer's close or abort (and by its own endpoint's close);
 * the need-wakeup flags ring the doorbell once per sleep, not per publish;
 * and no wakeup is lost in long ping-pong and bulk runs.  Spinning is off
 * (circuit_set_spin 0) wherever a test needs the thread really asleep.
 */
#include "harness.h"

#include <pthread.h>

#define RING 4096u

enum what { DO_RECV, DO_SEND };

struct worker {
    struct circuit *c;
    enum what what;
    void *buf;
    size_t len;
    int flags;
    pid_t tid;
    ssize_t rc;
    int64_t took;
    pthread_t thread;
};

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    __atomic_store_n(&w->tid, gettid(), __ATOMIC_RELEASE);
    int64_t t0 = now_ns();
    if (w->what == DO_RECV)
        w->rc = circuit_recv(w->c, w->buf, w->len, w->flags, CIRCUIT_FOREVER);
    else
        w->rc = circuit_send(w->c, w->buf, w->len, w->flags, CIRCUIT_FOREVER);
    w->took = now_ns() - t0;
    return NULL;
}

/* Start a worker and return once it is asleep inside the call. */
static void start_asleep(struct worker *w)
{
    w->tid = 0;
    CHECK(pthread_create(&w->thread, NULL, worker_main, w) == 0);
    while (!__atomic_load_n(&w->tid, __ATOMIC_ACQUIRE))
        sleep_ms(1);
    wait_sleeping(w->tid);
}

static void finish(struct worker *w) { CHECK(pthread_join(w->thread, NULL) == 0); }

static void quiet(struct pair *pr)
{
    circuit_set_spin(pr->c[0], 0);
    circuit_set_spin(pr->c[1], 0);
}

static void test_recv_woken_by_send(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    quiet(&pr);
    uint8_t *m = raw_map(&pr);
    char buf[64] = {0};
    for (int round = 0; round < 3; round++) {
        struct worker w = {.c = pr.c[1], .what = DO_RECV, .buf = buf, .len = sizeof(buf)};
        start_asleep(&w);
        /* Asleep, and it said so: the producer will ring. */
        CHECK_EQ(raw_dir(m, 0)->cons_wait, 1);
        sleep_ms(30);
        CHECK_EQ(circuit_send(pr.c[0], "wake up", 7, 0, CIRCUIT_FOREVER), 7);
        finish(&w);
        CHECK_EQ(w.rc, 7);
        CHECK(memcmp(buf, "wake up", 7) == 0);
        CHECK(w.took >= 30 * 1000000LL);
        CHECK_EQ(raw_dir(m, 0)->cons_wait, 0); /* the ring took the flag down */
    }
    /* Same for datagrams. */
    raw_unmap(&pr, m);
    pair_close(&pr);
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    quiet(&pr);
    struct worker w = {.c = pr.c[0], .what = DO_RECV, .buf = buf, .len = sizeof(buf)};
    start_asleep(&w);
    CHECK_EQ(circuit_send(pr.c[1], "dgram", 5, 0, CIRCUIT_FOREVER), 5);
    finish(&w);
    CHECK_EQ(w.rc, 5);
    CHECK(memcmp(buf, "dgram", 5) == 0);
    pair_close(&pr);
    OK("recv_woken_by_send");
}

static void test_send_woken_by_recv(void)
{
    static uint8_t fillbuf[RING], out[300], in[RING];
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        struct pair pr;
        pair_open(&pr, kind, RING, RING);
        quiet(&pr);
        uint8_t *m = raw_map(&pr);
        /* Fill the ring exactly. */
        size_t first = kind == CIRCUIT_DGRAM ? RING - 8 : RING;
        CHECK_EQ(circuit_send(pr.c[0], fillbuf, first, 0, CIRCUIT_FOREVER), first);
        memset(out, 'q', sizeof(out));
        struct worker w = {.c = pr.c[0], .what = DO_SEND, .buf = out, .len = sizeof(out),
                           .flags = CIRCUIT_ALL};
        start_asleep(&w);
        CHECK_EQ(raw_dir(m, 0)->prod_wait, 1);
        sleep_ms(20);
        CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), 0, CIRCUIT_FOREVER), first);
        finish(&w);
        CHECK_EQ(w.rc, sizeof(out));
        CHECK(w.took >= 20 * 1000000LL);
        CHECK_EQ(raw_dir(m, 0)->prod_wait, 0);
        CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), 0, CIRCUIT_FOREVER), sizeof(out));
        CHECK_EQ(in[0], 'q');
        CHECK_EQ(in[sizeof(out) - 1], 'q');
        raw_unmap(&pr, m);
        pair_close(&pr);
    }
    /* A stream sender with ALL is woken again and again as room trickles in. */
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    quiet(&pr);
    static uint8_t big[3 * RING];
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = pattern(i);
    struct worker w = {.c = pr.c[0], .what = DO_SEND, .buf = big, .len = sizeof(big),
                       .flags = CIRCUIT_ALL};
    start_asleep(&w);
    size_t got = 0;
    while (got < sizeof(big)) {
        ssize_t n = circuit_recv(pr.c[1], in, 1000, 0, CIRCUIT_FOREVER);
        CHECK(n > 0);
        for (ssize_t i = 0; i < n; i++)
            CHECK_EQ(in[i], pattern(got + (size_t)i));
        got += (size_t)n;
    }
    finish(&w);
    CHECK_EQ(w.rc, sizeof(big));
    pair_close(&pr);
    OK("send_woken_by_recv");
}

static void test_woken_by_end(void)
{
    uint8_t buf[RING];
    static uint8_t full[RING];
    /* The peer closes: a receiver sees the end, a sender the broken pipe. */
    for (int how = 0; how < 4; how++) {
        struct pair pr;
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        quiet(&pr);
        struct worker w = {.c = pr.c[1], .what = DO_RECV, .buf = buf, .len = sizeof(buf)};
        if (how >= 2) {
            CHECK_EQ(circuit_send(pr.c[1], full, RING, 0, CIRCUIT_FOREVER), RING);
            w = (struct worker){.c = pr.c[1], .what = DO_SEND, .buf = full, .len = 1};
        }
        start_asleep(&w);
        if (how % 2 == 0)
            CHECK_EQ(circuit_close(pr.c[0]), 0);
        else
            CHECK_EQ(circuit_abort(pr.c[0]), 0);
        finish(&w);
        static const ssize_t want[] = {-ESHUTDOWN, -ECONNRESET, -EPIPE, -ECONNRESET};
        CHECK_EQ(w.rc, want[how]);
        pair_close(&pr);
    }
    /* The peer shuts down writing: the receiver wakes to the end of data. */
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    quiet(&pr);
    struct worker w = {.c = pr.c[1], .what = DO_RECV, .buf = buf, .len = sizeof(buf)};
    start_asleep(&w);
    CHECK_EQ(circuit_shutdown_write(pr.c[0]), 0);
    finish(&w);
    CHECK_EQ(w.rc, -ESHUTDOWN);
    pair_close(&pr);
    /* Our own endpoint is closed under a sleeper: it wakes with EBADF. */
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    quiet(&pr);
    w = (struct worker){.c = pr.c[1], .what = DO_RECV, .buf = buf, .len = sizeof(buf)};
    start_asleep(&w);
    CHECK_EQ(circuit_close(pr.c[1]), 0);
    finish(&w);
    CHECK_EQ(w.rc, -EBADF);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    pair_close(&pr);
    OK("close_abort_shutdown_wake_sleepers");
}

/* One publish rings a sleeping consumer once; later publishes while it is
 * awake leave its doorbell alone, until it arms again. */
static void test_need_wakeup_consumed(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    quiet(&pr);
    uint8_t *m = raw_map(&pr);
    struct circuit_dir_ctrl *d0 = raw_dir(m, 0);
    const int bell1 = circuit_bell(pr.c[1]), bell0 = circuit_bell(pr.c[0]);
    uint8_t buf[RING];

    /* Consumers start armed: the first data rings. */
    CHECK_EQ(d0->cons_wait, 1);
    CHECK_EQ(bell_take(bell1), 0);
    CHECK_EQ(circuit_send(pr.c[0], "a", 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(d0->cons_wait, 0);
    CHECK_EQ(bell_take(bell1), 1);
    CHECK_EQ(circuit_send(pr.c[0], "b", 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_send(pr.c[0], "c", 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(bell_take(bell1), 0);
    /* Receiving data that is there neither arms nor rings. */
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 3);
    CHECK_EQ(d0->cons_wait, 0);
    CHECK_EQ(circuit_send(pr.c[0], "d", 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(bell_take(bell1), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1);
    /* A receive that finds nothing arms; the next publish rings, once. */
    CHECK_EQ(circuit_recv(pr.c[1], buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(d0->cons_wait, 1);
    CHECK_EQ(bell_take(bell1), 0);
    for (int i = 0; i < 5; i++)
        CHECK_EQ(circuit_send(pr.c[0], "e", 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(bell_take(bell1), 1);
    CHECK_EQ(d0->cons_wait, 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 5);

    /* The producer's flag works the same way. */
    struct circuit_dir_ctrl *d1 = raw_dir(m, 1);
    CHECK_EQ(bell_take(bell0), 0);
    CHECK_EQ(d1->prod_wait, 0);
    CHECK_EQ(circuit_send(pr.c[1], buf, RING, 0, CIRCUIT_FOREVER), RING);
    CHECK_EQ(bell_take(bell0), 1); /* d1's consumer started armed */
    CHECK_EQ(circuit_recv(pr.c[0], buf, 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(bell_take(bell1), 0); /* nobody waits for room yet */
    CHECK_EQ(circuit_send(pr.c[1], buf, 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_send(pr.c[1], buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(d1->prod_wait, 1);
    CHECK_EQ(bell_take(bell1), 0);
    CHECK_EQ(circuit_recv(pr.c[0], buf, 10, 0, CIRCUIT_FOREVER), 10);
    CHECK_EQ(d1->prod_wait, 0);
    CHECK_EQ(bell_take(bell1), 1);
    CHECK_EQ(circuit_recv(pr.c[0], buf, 10, 0, CIRCUIT_FOREVER), 10);
    CHECK_EQ(circuit_recv(pr.c[0], buf, 10, 0, CIRCUIT_FOREVER), 10);
    CHECK_EQ(bell_take(bell1), 0);

    /* A sleeping consumer costs the producer exactly one ring per sleep. */
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), CIRCUIT_ALL | CIRCUIT_NONBLOCK,
                          CIRCUIT_FOREVER), RING - 30);
    struct worker w = {.c = pr.c[0], .what = DO_RECV, .buf = buf, .len = 1};
    start_asleep(&w);
    CHECK_EQ(d1->cons_wait, 1);
    CHECK_EQ(circuit_send(pr.c[1], "xyz", 3, 0, CIRCUIT_FOREVER), 3);
    finish(&w);
    CHECK_EQ(w.rc, 1);
    CHECK_EQ(d1->cons_wait, 0);
    CHECK_EQ(circuit_send(pr.c[1], "more", 4, 0, CIRCUIT_FOREVER), 4);
    /* The one ring it got is still counted (the waker drains only on its
     * next sleep); the second publish added nothing. */
    CHECK_EQ(bell_take(bell0), 1);
    raw_unmap(&pr, m);
    pair_close(&pr);
    OK("need_wakeup_consumed");
}

/* One endpoint, two threads asleep on one doorbell: a receiver and a sender
 * on a full ring.  Each must be woken by its own event, none lost. */
static void test_two_sleepers(void)
{
    static uint8_t full[RING], in[RING];
    for (int order = 0; order < 2; order++) {
        struct pair pr;
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        quiet(&pr);
        CHECK_EQ(circuit_send(pr.c[0], full, RING, 0, CIRCUIT_FOREVER), RING);
        uint8_t rbuf[16];
        struct worker r = {.c = pr.c[0], .what = DO_RECV, .buf = rbuf, .len = sizeof(rbuf)};
        struct worker s = {.c = pr.c[0], .what = DO_SEND, .buf = full, .len = 5};
        start_asleep(&r);
        start_asleep(&s);
        if (order == 0) {
            CHECK_EQ(circuit_send(pr.c[1], "hi", 2, 0, CIRCUIT_FOREVER), 2);
            finish(&r);
            CHECK_EQ(r.rc, 2);
            CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), 0, CIRCUIT_FOREVER), RING);
            finish(&s);
            CHECK_EQ(s.rc, 5);
        } else {
            CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), 0, CIRCUIT_FOREVER), RING);
            finish(&s);
            CHECK_EQ(s.rc, 5);
            CHECK_EQ(circuit_send(pr.c[1], "hi", 2, 0, CIRCUIT_FOREVER), 2);
            finish(&r);
            CHECK_EQ(r.rc, 2);
        }
        CHECK(memcmp(rbuf, "hi", 2) == 0);
        pair_close(&pr);
    }
    OK("two_sleepers_one_bell");
}

/* Many round trips and a bulk transfer with both sides sleeping: a lost
 * wakeup would hang here (and the alarm would end the test). */
struct bulk {
    struct circuit *c;
    uint64_t total;
    int rounds;
    uint64_t seed;
};

static void *echo_main(void *arg)
{
    struct bulk *b = arg;
    uint8_t buf[64];
    for (int i = 0; i < b->rounds; i++) {
        ssize_t n = circuit_recv(b->c, buf, sizeof(buf), 0, CIRCUIT_FOREVER);
        CHECK(n > 0);
        CHECK_EQ(circuit_send(b->c, buf, (size_t)n, CIRCUIT_ALL, CIRCUIT_FOREVER), n);
    }
    return NULL;
}

static void *producer_main(void *arg)
{
    struct bulk *b = arg;
    static uint8_t buf[3 * RING];
    uint64_t at = 0;
    while (at < b->total) {
        size_t n = 1 + (size_t)(rnd(&b->seed) % sizeof(buf));
        if (n > b->total - at)
            n = (size_t)(b->total - at);
        for (size_t i = 0; i < n; i++)
            buf[i] = pattern(at + i);
        ssize_t rc = circuit_send(b->c, buf, n, rnd(&b->seed) & 1 ? CIRCUIT_ALL : 0,
                                  CIRCUIT_FOREVER);
        CHECK(rc > 0 && (size_t)rc <= n);
        at += (uint64_t)rc;
    }
    CHECK_EQ(circuit_shutdown_write(b->c), 0);
    return NULL;
}

static void test_no_lost_wakeups(void)
{
    for (int spin = 0; spin < 2; spin++) {
        struct pair pr;
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        if (!spin)
            quiet(&pr);
        else {
            circuit_set_spin(pr.c[0], 2000);
            circuit_set_spin(pr.c[1], 2000);
        }
        /* Ping-pong. */
        struct bulk e = {.c = pr.c[1], .rounds = 3000};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, echo_main, &e) == 0);
        for (int i = 0; i < e.rounds; i++) {
            uint8_t msg[4], back[4];
            memcpy(msg, &i, 4);
            CHECK_EQ(circuit_send(pr.c[0], msg, 4, 0, CIRCUIT_FOREVER), 4);
            CHECK_EQ(circuit_recv(pr.c[0], back, 4, CIRCUIT_ALL, CIRCUIT_FOREVER), 4);
            CHECK(memcmp(msg, back, 4) == 0);
        }
        CHECK(pthread_join(t, NULL) == 0);

        /* Bulk, odd chunks, both ends waiting on each other. */
        struct bulk b = {.c = pr.c[0], .total = 4u << 20, .seed = 77 + (uint64_t)spin};
        CHECK(pthread_create(&t, NULL, producer_main, &b) == 0);
        static uint8_t in[2 * RING];
        uint64_t got = 0, seed = 5;
        for (;;) {
            size_t want = 1 + (size_t)(rnd(&seed) % sizeof(in));
            ssize_t n = circuit_recv(pr.c[1], in, want, 0, CIRCUIT_FOREVER);
            if (n == -ESHUTDOWN)
                break;
            CHECK(n > 0 && (size_t)n <= want);
            for (ssize_t i = 0; i < n; i++)
                if (in[i] != pattern(got + (uint64_t)i))
                    CHECK(!"bulk stream corrupted");
            got += (uint64_t)n;
        }
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_EQ(got, b.total);
        pair_close(&pr);
    }
    OK("no_lost_wakeups");
}

int main(void)
{
    alarm(30);
    test_recv_woken_by_send();
    test_send_woken_by_recv();
    test_woken_by_end();
    test_need_wakeup_consumed();
    test_two_sleepers();
    test_no_lost_wakeups();
    return 0;
}
