/*
 * test_stream.c - byte streams through the copying calls: round trips, the
 * wrap, CIRCUIT_ALL, non-blocking and deadlines, and every way a
 * conversation ends (shutdown, close, abort, death, use after close).
 */
#include "harness.h"

#include <pthread.h>

#define RING 4096u

static void verify(const uint8_t *buf, uint64_t start, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (buf[i] != pattern(start + i)) {
            fprintf(stderr, "byte %" PRIu64 ": got %u want %u\n", start + i, buf[i],
                    pattern(start + i));
            CHECK(!"stream corrupted");
        }
}

static void test_round_trip(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, 2 * RING);
    char buf[64];
    CHECK_EQ(circuit_send(pr.c[0], "hello", 5, 0, CIRCUIT_FOREVER), 5);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 5);
    CHECK(memcmp(buf, "hello", 5) == 0);
    CHECK_EQ(circuit_send(pr.c[1], "world!", 6, 0, CIRCUIT_FOREVER), 6);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 6);
    CHECK(memcmp(buf, "world!", 6) == 0);
    /* A short buffer takes part; the rest stays for the next call. */
    CHECK_EQ(circuit_send(pr.c[0], "abcdef", 6, 0, CIRCUIT_FOREVER), 6);
    CHECK_EQ(circuit_recv(pr.c[1], buf, 4, 0, CIRCUIT_FOREVER), 4);
    CHECK(memcmp(buf, "abcd", 4) == 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, 0, 0, CIRCUIT_FOREVER), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, 64, 0, CIRCUIT_FOREVER), 2);
    CHECK(memcmp(buf, "ef", 2) == 0);
    CHECK_EQ(circuit_send(pr.c[0], buf, 0, 0, CIRCUIT_FOREVER), 0);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), 11);
    CHECK_EQ(circuit_bytes_received(pr.c[1]), 11);
    CHECK_EQ(circuit_bytes_sent(pr.c[1]), 6);
    CHECK_EQ(circuit_bytes_received(pr.c[0]), 6);
    CHECK_EQ(circuit_area_size(pr.c[0], 0), RING);
    CHECK_EQ(circuit_area_size(pr.c[0], 1), 2 * RING);
    CHECK_EQ(circuit_area_size(pr.c[1], 0), 2 * RING);
    /* Without CIRCUIT_ALL a send takes what fits, once. */
    static uint8_t big[3 * RING];
    fill(big, 0, sizeof(big));
    CHECK_EQ(circuit_send(pr.c[0], big, sizeof(big), 0, CIRCUIT_FOREVER), RING);
    CHECK_EQ(circuit_send(pr.c[0], big, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    static uint8_t got[3 * RING];
    CHECK_EQ(circuit_recv(pr.c[1], got, sizeof(got), 0, CIRCUIT_FOREVER), RING);
    verify(got, 0, RING);
    pair_close(&pr);
    OK("round_trip");
}

/* Odd chunk sizes on both ends, many times around the ring. */
static void test_wrap(void)
{
    static const size_t send_sizes[] = {1, 3, 7, 13, 61, 509, 1021, 2039, 4093, 4096, 5003, 250};
    static const size_t recv_sizes[] = {2, 5, 11, 17, 997, 3001, 4095, 4097, 31, 1};
    const uint64_t total = 200 * RING + 17;
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    static uint8_t buf[8192];
    uint64_t sent = 0, got = 0;
    unsigned si = 0, ri = 0, rounds = 0;
    while (got < total) {
        size_t n = send_sizes[si++ % 12];
        if (n > total - sent)
            n = total - sent;
        if (n) {
            fill(buf, sent, n);
            ssize_t rc = circuit_send(pr.c[0], buf, n, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER);
            CHECK(rc == -EAGAIN || (rc > 0 && (size_t)rc <= n));
            if (rc > 0)
                sent += (uint64_t)rc;
            CHECK(sent - got <= RING);
        }
        size_t m = recv_sizes[ri++ % 10];
        ssize_t rc = circuit_recv(pr.c[1], buf, m, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER);
        if (sent == got)
            CHECK_EQ(rc, -EAGAIN);
        else
            CHECK_EQ(rc, (ssize_t)(m < sent - got ? m : sent - got));
        if (rc > 0) {
            verify(buf, got, (size_t)rc);
            got += (uint64_t)rc;
        }
        CHECK(++rounds < 10000000);
    }
    CHECK_EQ(sent, total);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), total);
    CHECK_EQ(circuit_bytes_received(pr.c[1]), total);
    CHECK_EQ(circuit_recv(pr.c[1], buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    pair_close(&pr);
    OK("wrap_odd_chunks");
}

struct sender {
    struct circuit *c;
    const uint8_t *buf;
    size_t len;
    int flags;
    ssize_t rc;
};

static void *send_thread(void *arg)
{
    struct sender *s = arg;
    s->rc = circuit_send(s->c, s->buf, s->len, s->flags, CIRCUIT_FOREVER);
    return NULL;
}

static void test_all(void)
{
    enum { LEN = 7 * RING + 123 };
    static uint8_t out[LEN], in[LEN];
    fill(out, 1000, LEN);
    for (int spin = 0; spin < 2; spin++) {
        struct pair pr;
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        if (!spin) {
            circuit_set_spin(pr.c[0], 0);
            circuit_set_spin(pr.c[1], 0);
        }
        memset(in, 0, sizeof(in));
        struct sender s = {pr.c[0], out, LEN, CIRCUIT_ALL, 0};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, send_thread, &s) == 0);
        /* Uneven ALL receives: each returns exactly what it asked for. */
        size_t at = 0, step = 3 * RING / 2 + 5;
        while (at < LEN) {
            size_t n = LEN - at < step ? LEN - at : step;
            CHECK_EQ(circuit_recv(pr.c[1], in + at, n, CIRCUIT_ALL, CIRCUIT_FOREVER), n);
            at += n;
        }
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_EQ(s.rc, LEN);
        verify(in, 1000, LEN);

        /* ALL with a deadline returns what it got if time runs out partway. */
        CHECK_EQ(circuit_send(pr.c[0], out, 100, 0, CIRCUIT_FOREVER), 100);
        CHECK_EQ(circuit_recv(pr.c[1], in, 200, CIRCUIT_ALL, in_ms(30)), 100);
        verify(in, 1000, 100);
        /* ... and a send with ALL likewise, once the ring is full. */
        CHECK_EQ(circuit_send(pr.c[0], out, 2 * RING, CIRCUIT_ALL, in_ms(30)), RING);
        /* NONBLOCK with ALL: what fits, then stop rather than wait. */
        CHECK_EQ(circuit_recv(pr.c[1], in, 10, 0, CIRCUIT_FOREVER), 10);
        CHECK_EQ(circuit_send(pr.c[0], out, 100, CIRCUIT_ALL | CIRCUIT_NONBLOCK,
                              CIRCUIT_FOREVER), 10);
        CHECK_EQ(circuit_recv(pr.c[1], in, 2 * RING, CIRCUIT_ALL | CIRCUIT_NONBLOCK,
                              CIRCUIT_FOREVER), RING);
        pair_close(&pr);
    }
    OK("all_flag");
}

static void test_nonblock(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    uint8_t buf[RING];
    fill(buf, 0, RING);
    CHECK_EQ(circuit_recv(pr.c[1], buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(circuit_recv(pr.c[0], buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    void *p;
    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &p), -EAGAIN);
    CHECK_EQ(circuit_send(pr.c[0], buf, RING - 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), RING - 1);
    CHECK_EQ(circuit_send(pr.c[0], buf, 5, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_send(pr.c[0], buf, 5, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(circuit_reserve(pr.c[0], 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &p), -EAGAIN);
    /* The other direction is independent. */
    CHECK_EQ(circuit_send(pr.c[1], buf, 5, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 5);
    CHECK_EQ(circuit_recv(pr.c[1], buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_send(pr.c[0], buf, 5, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_send(pr.c[0], buf, 5, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    pair_close(&pr);
    OK("nonblock_eagain");
}

static void test_deadline(void)
{
    for (int spin = 0; spin < 2; spin++) {
        struct pair pr;
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        if (!spin)
            circuit_set_spin(pr.c[1], 0);
        uint8_t buf[RING];
        int64_t t0 = now_ns();
        CHECK_EQ(circuit_recv(pr.c[1], buf, 1, 0, t0 + 50 * 1000000LL), -ETIMEDOUT);
        int64_t took = now_ns() - t0;
        CHECK(took >= 50 * 1000000LL && took < 5000 * 1000000LL);
        void *p;
        CHECK_EQ(circuit_peek(pr.c[1], 0, in_ms(10), &p), -ETIMEDOUT);
        /* A deadline already past fails at once, even with room to wait. */
        t0 = now_ns();
        CHECK_EQ(circuit_recv(pr.c[1], buf, 1, 0, t0 - 1), -ETIMEDOUT);
        CHECK_EQ(circuit_recv(pr.c[1], buf, 1, 0, 0), -ETIMEDOUT);
        CHECK(now_ns() - t0 < 1000 * 1000000LL);
        /* A full ring times a sender out. */
        CHECK_EQ(circuit_send(pr.c[1], buf, RING, 0, CIRCUIT_FOREVER), RING);
        t0 = now_ns();
        CHECK_EQ(circuit_send(pr.c[1], buf, 1, 0, t0 + 30 * 1000000LL), -ETIMEDOUT);
        CHECK(now_ns() - t0 >= 30 * 1000000LL);
        CHECK_EQ(circuit_reserve(pr.c[1], 1, 0, in_ms(10), &p), -ETIMEDOUT);
        /* Data waiting: a past deadline does not hide it. */
        CHECK_EQ(circuit_recv(pr.c[0], buf, RING, 0, 0), RING);
        pair_close(&pr);
    }
    OK("deadline_etimedout");
}

static void test_shutdown_write(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    char buf[RING];
    CHECK_EQ(circuit_send(pr.c[0], "abc", 3, 0, CIRCUIT_FOREVER), 3);
    CHECK_EQ(circuit_send(pr.c[0], "defg", 4, 0, CIRCUIT_FOREVER), 4);
    CHECK_EQ(circuit_shutdown_write(pr.c[0]), 0);
    CHECK_EQ(circuit_shutdown_write(pr.c[0]), 0);
    CHECK_EQ(circuit_send(pr.c[0], "x", 1, 0, CIRCUIT_FOREVER), -EPIPE);
    void *p;
    CHECK_EQ(circuit_reserve(pr.c[0], 1, 0, CIRCUIT_FOREVER, &p), -EPIPE);
    /* The peer drains what was sent, then learns of the end, every time. */
    CHECK_EQ(circuit_recv(pr.c[1], buf, 5, 0, CIRCUIT_FOREVER), 5);
    CHECK(memcmp(buf, "abcde", 5) == 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 2);
    CHECK(memcmp(buf, "fg", 2) == 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
             -ESHUTDOWN);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &p), -ESHUTDOWN);
    /* Half close: the other direction still works both ways round. */
    CHECK_EQ(circuit_send(pr.c[1], "reply", 5, 0, CIRCUIT_FOREVER), 5);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 5);
    CHECK(memcmp(buf, "reply", 5) == 0);
    CHECK_EQ(circuit_shutdown_write(pr.c[1]), 0);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    pair_close(&pr);
    OK("shutdown_write");
}

static void test_close(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    uint8_t buf[RING];
    fill(buf, 0, 3000);
    CHECK_EQ(circuit_send(pr.c[0], buf, 3000, 0, CIRCUIT_FOREVER), 3000);
    CHECK_EQ(circuit_close(pr.c[0]), 0);
    memset(buf, 0, sizeof(buf));
    CHECK_EQ(circuit_recv(pr.c[1], buf, 1000, 0, CIRCUIT_FOREVER), 1000);
    CHECK_EQ(circuit_send(pr.c[1], buf, 10, 0, CIRCUIT_FOREVER), -EPIPE);
    CHECK_EQ(circuit_recv(pr.c[1], buf + 1000, sizeof(buf), 0, CIRCUIT_FOREVER), 2000);
    verify(buf, 0, 3000);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    CHECK_EQ(circuit_send(pr.c[1], buf, 10, 0, CIRCUIT_FOREVER), -EPIPE);
    void *p;
    CHECK_EQ(circuit_reserve(pr.c[1], 1, 0, CIRCUIT_FOREVER, &p), -EPIPE);
    CHECK(circuit_poll(pr.c[1]) & CIRCUIT_HANGUP);
    pair_close(&pr);
    OK("close_peer_sees_end");
}

static void test_abort(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    uint8_t buf[64];
    CHECK_EQ(circuit_abort(pr.c[0]), 0);
    CHECK_EQ(circuit_abort(pr.c[0]), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ECONNRESET);
    CHECK_EQ(circuit_send(pr.c[1], buf, 5, 0, CIRCUIT_FOREVER), -ECONNRESET);
    void *p;
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &p), -ECONNRESET);
    CHECK_EQ(circuit_reserve(pr.c[1], 1, 0, CIRCUIT_FOREVER, &p), -ECONNRESET);
    /* The aborting side is reset too. */
    CHECK_EQ(circuit_send(pr.c[0], buf, 5, 0, CIRCUIT_FOREVER), -ECONNRESET);
    CHECK_EQ(circuit_recv(pr.c[0], buf, 5, 0, CIRCUIT_FOREVER), -ECONNRESET);
    CHECK(circuit_poll(pr.c[1]) & CIRCUIT_HANGUP);
    /* A later shutdown or close cannot take the abort back. */
    CHECK_EQ(circuit_close(pr.c[0]), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ECONNRESET);
    pair_close(&pr);

    /* Abort after a shutdown still resets. */
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    CHECK_EQ(circuit_shutdown_write(pr.c[0]), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    CHECK_EQ(circuit_abort(pr.c[0]), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ECONNRESET);
    CHECK_EQ(circuit_send(pr.c[1], buf, 5, 0, CIRCUIT_FOREVER), -ECONNRESET);
    pair_close(&pr);
    OK("abort_resets_peer");
}

static void *recv_thread(void *arg)
{
    struct sender *s = arg; /* buf is written through a cast: test only */
    s->rc = circuit_recv(s->c, (void *)s->buf, s->len, s->flags, CIRCUIT_FOREVER);
    return NULL;
}

/* Side 1 vanishes without a word: its fds close (detach), its state stays;
 * side 0 learns of it from the hang-up of its peer_bell. */
static void test_peer_death(void)
{
    struct pair pr;
    uint8_t buf[RING];
    for (int spin = 0; spin < 2; spin++) {
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        if (!spin)
            circuit_set_spin(pr.c[0], 0);
        CHECK_EQ(circuit_send(pr.c[1], "last words", 10, 0, CIRCUIT_FOREVER), 10);
        pair_vanish(&pr, 1);
        CHECK_EQ(circuit_recv(pr.c[0], buf, 4, 0, CIRCUIT_FOREVER), 4);
        CHECK_EQ(circuit_recv(pr.c[0], buf + 4, sizeof(buf), 0, CIRCUIT_FOREVER), 6);
        CHECK(memcmp(buf, "last words", 10) == 0);
        CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ECONNRESET);
        CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
                 -ECONNRESET);
        CHECK_EQ(circuit_send(pr.c[0], buf, 1, 0, CIRCUIT_FOREVER), -ECONNRESET);
        CHECK(circuit_poll(pr.c[0]) & CIRCUIT_HANGUP);
        pair_close(&pr);
    }

    /* A sender blocked on a full ring, and a receiver blocked on an empty
     * one, learn of the death. */
    for (int sending = 1; sending >= 0; sending--) {
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        circuit_set_spin(pr.c[0], 0);
        if (sending)
            CHECK_EQ(circuit_send(pr.c[0], buf, RING, 0, CIRCUIT_FOREVER), RING);
        struct sender s = {pr.c[0], buf, sending ? 1 : sizeof(buf), 0, 0};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, sending ? send_thread : recv_thread, &s) == 0);
        sleep_ms(30);
        pair_vanish(&pr, 1);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_EQ(s.rc, -ECONNRESET);
        pair_close(&pr);
    }

    /* Detach, seen from inside: fds gone, state untouched; only once. */
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    uint8_t *m = raw_map(&pr);
    CHECK_EQ(circuit_send(pr.c[1], "bye", 3, 0, CIRCUIT_FOREVER), 3);
    CHECK_EQ(circuit_detach(pr.c[1]), 0);
    CHECK_EQ(raw_hdr(m)->side[1].state, CIRCUIT_OPEN);
    CHECK_EQ(circuit_bell(pr.c[1]), -1);
    raw_unmap(&pr, m);
    CHECK_EQ(circuit_detach(pr.c[1]), -EBADF);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 3);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ECONNRESET);
    pair_close(&pr);

    /* Dying after a shutdown is a clean end of data for the reader. */
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    CHECK_EQ(circuit_send(pr.c[1], "ok", 2, 0, CIRCUIT_FOREVER), 2);
    CHECK_EQ(circuit_shutdown_write(pr.c[1]), 0);
    pair_vanish(&pr, 1);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 2);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    CHECK(circuit_poll(pr.c[0]) & CIRCUIT_HANGUP);
    CHECK_EQ(circuit_send(pr.c[0], buf, 1, 0, CIRCUIT_FOREVER), -ECONNRESET);
    pair_close(&pr);
    OK("peer_death_via_doorbell_hangup");
}

static void test_after_close(void)
{
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        struct pair pr;
        pair_open(&pr, kind, RING, RING);
        struct circuit *c = pr.c[0];
        uint8_t buf[16] = {0};
        void *p;
        CHECK_EQ(circuit_close(c), 0);
        CHECK_EQ(circuit_send(c, buf, 1, 0, CIRCUIT_FOREVER), -EBADF);
        CHECK_EQ(circuit_send(c, buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EBADF);
        CHECK_EQ(circuit_recv(c, buf, 1, 0, CIRCUIT_FOREVER), -EBADF);
        CHECK_EQ(circuit_recv(c, buf, 0, 0, CIRCUIT_FOREVER), -EBADF);
        CHECK_EQ(circuit_reserve(c, 1, 0, CIRCUIT_FOREVER, &p), -EBADF);
        CHECK_EQ(circuit_commit(c, 0), -EBADF);
        CHECK_EQ(circuit_peek(c, 0, CIRCUIT_FOREVER, &p), -EBADF);
        CHECK_EQ(circuit_consume(c, 0), -EBADF);
        CHECK_EQ(circuit_shutdown_write(c), -EBADF);
        CHECK_EQ(circuit_abort(c), -EBADF);
        CHECK_EQ(circuit_close(c), -EBADF);
        CHECK_EQ(circuit_detach(c), -EBADF);
        CHECK_EQ(circuit_arm_read(c), -EBADF);
        CHECK_EQ(circuit_poll(c), CIRCUIT_READABLE | CIRCUIT_WRITABLE | CIRCUIT_HANGUP);
        CHECK_EQ(circuit_bell(c), -1);
        /* The peer saw a close, not an abort. */
        CHECK_EQ(circuit_recv(pr.c[1], buf, 1, 0, CIRCUIT_FOREVER), -ESHUTDOWN);
        CHECK_EQ(circuit_send(pr.c[1], buf, 1, 0, CIRCUIT_FOREVER), -EPIPE);
        pair_close(&pr);
    }
    OK("calls_after_close_ebadf");
}

/* Our state only moves forward, whichever call and thread comes last. */
struct racer {
    struct circuit *c;
    int abort;
    int *go;
};

static void *racer_main(void *arg)
{
    struct racer *r = arg;
    while (!__atomic_load_n(r->go, __ATOMIC_ACQUIRE))
        ;
    CHECK_EQ(r->abort ? circuit_abort(r->c) : circuit_shutdown_write(r->c), 0);
    return NULL;
}

static void test_state_never_back(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    uint8_t *m = raw_map(&pr);
    uint8_t buf[8];
    CHECK_EQ(circuit_abort(pr.c[0]), 0);
    CHECK_EQ(circuit_shutdown_write(pr.c[0]), 0);
    CHECK_EQ(raw_hdr(m)->side[0].state, CIRCUIT_ABORTED);
    CHECK_EQ(circuit_close(pr.c[0]), 0);
    CHECK_EQ(raw_hdr(m)->side[0].state, CIRCUIT_ABORTED);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ECONNRESET);
    raw_unmap(&pr, m);
    pair_close(&pr);
    /* Two threads ending one endpoint at once: ABORTED wins every time. */
    for (int i = 0; i < 100; i++) {
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        m = raw_map(&pr);
        int go = 0;
        struct racer a = {pr.c[0], 0, &go}, b = {pr.c[0], 1, &go};
        pthread_t ta, tb;
        CHECK(pthread_create(&ta, NULL, racer_main, &a) == 0);
        CHECK(pthread_create(&tb, NULL, racer_main, &b) == 0);
        __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
        CHECK(pthread_join(ta, NULL) == 0);
        CHECK(pthread_join(tb, NULL) == 0);
        CHECK_EQ(raw_hdr(m)->side[0].state, CIRCUIT_ABORTED);
        raw_unmap(&pr, m);
        pair_close(&pr);
    }
    OK("state_never_moves_back");
}

int main(void)
{
    alarm(30);
    test_round_trip();
    test_wrap();
    test_all();
    test_nonblock();
    test_deadline();
    test_shutdown_write();
    test_close();
    test_abort();
    test_peer_death();
    test_after_close();
    test_state_never_back();
    return 0;
}
