/*
 * test_zerocopy.c - reserve/commit and peek/consume on streams and
 * datagrams: spans in place, spans across the wrap (one piece, thanks to the
 * mirror mapping), and the misuses that must fail with -EINVAL.
 */
#include "harness.h"

#define RING 4096u

static int matches(const uint8_t *buf, uint64_t start, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (buf[i] != pattern(start + i))
            return 0;
    return 1;
}

static void test_mirror(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, 2 * RING);
    for (int s = 0; s < 2; s++)
        for (int dir = 0; dir < 2; dir++) {
            uint8_t *base = circuit_area_base(pr.c[s], dir);
            uint64_t size = circuit_area_size(pr.c[s], dir);
            base[5] = (uint8_t)(0x40 + s * 2 + dir);
            CHECK_EQ(base[size + 5], 0x40 + s * 2 + dir);
            base[2 * size - 1] = 0x5a;
            CHECK_EQ(base[size - 1], 0x5a);
            base[5] = base[size - 1] = 0;
        }
    /* Side 0's transmit area is side 1's receive area. */
    uint8_t *tx0 = circuit_area_base(pr.c[0], 0), *rx1 = circuit_area_base(pr.c[1], 1);
    tx0[100] = 0x77;
    CHECK_EQ(rx1[100], 0x77);
    tx0[100] = 0;
    pair_close(&pr);
    OK("mirror_mapping");
}

static void test_stream_basic(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    void *w, *r;
    CHECK_EQ(circuit_reserve(pr.c[0], 10, 0, CIRCUIT_FOREVER, &w), RING);
    CHECK(w == circuit_area_base(pr.c[0], 0));
    memcpy(w, "hello world", 11);
    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &r), -EAGAIN);
    CHECK_EQ(circuit_commit(pr.c[0], 11), 0);
    CHECK_EQ(circuit_commit(pr.c[0], 1), -EINVAL); /* the reservation is spent */
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), 11);

    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 11);
    CHECK(r == circuit_area_base(pr.c[1], 1));
    CHECK(memcmp(r, "hello world", 11) == 0);
    CHECK_EQ(circuit_consume(pr.c[1], 12), -EINVAL);
    CHECK_EQ(circuit_consume(pr.c[1], 6), 0);
    CHECK_EQ(circuit_consume(pr.c[1], 6), -EINVAL); /* only 5 left of the peek */
    CHECK_EQ(circuit_consume(pr.c[1], 2), 0);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 3);
    CHECK(memcmp(r, "rld", 3) == 0);
    CHECK_EQ(circuit_consume(pr.c[1], 3), 0);
    CHECK_EQ(circuit_bytes_received(pr.c[1]), 11);
    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &r), -EAGAIN);

    /* Reserve reports all the room; a smaller commit publishes only that. */
    CHECK_EQ(circuit_reserve(pr.c[0], 1, 0, CIRCUIT_FOREVER, &w), RING);
    memcpy(w, "abcdef", 6);
    CHECK_EQ(circuit_commit(pr.c[0], 2), 0);
    CHECK_EQ(circuit_reserve(pr.c[0], RING - 2, 0, CIRCUIT_FOREVER, &w), RING - 2);
    CHECK_EQ(circuit_reserve(pr.c[0], RING - 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &w),
             -EAGAIN);
    CHECK_EQ(circuit_reserve(pr.c[0], RING + 1, 0, CIRCUIT_FOREVER, &w), -EINVAL);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 2);
    CHECK(memcmp(r, "ab", 2) == 0);
    /* A zero commit publishes nothing. */
    CHECK_EQ(circuit_reserve(pr.c[0], 0, 0, CIRCUIT_FOREVER, &w), RING - 2);
    CHECK_EQ(circuit_commit(pr.c[0], 0), 0);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 2);
    CHECK_EQ(circuit_consume(pr.c[1], 2), 0);
    pair_close(&pr);
    OK("stream_reserve_commit_peek_consume");
}

/* Put both indices of direction 0 at `at` by moving real data through. */
static void advance(struct pair *pr, uint64_t at)
{
    static uint8_t junk[RING];
    while (circuit_bytes_sent(pr->c[0]) < at) {
        uint64_t n = at - circuit_bytes_sent(pr->c[0]);
        if (pr->p.kind == CIRCUIT_DGRAM) {
            /* one record of exactly n bytes, header included */
            CHECK(n % 8 == 0 && n >= 8);
            if (n > RING)
                n = RING;
            CHECK_EQ(circuit_send(pr->c[0], junk, n - 8, 0, CIRCUIT_FOREVER), n - 8);
            CHECK_EQ(circuit_recv(pr->c[1], junk, RING, 0, CIRCUIT_FOREVER), n - 8);
        } else {
            if (n > RING)
                n = RING;
            CHECK_EQ(circuit_send(pr->c[0], junk, n, 0, CIRCUIT_FOREVER), n);
            CHECK_EQ(circuit_recv(pr->c[1], junk, n, CIRCUIT_ALL, CIRCUIT_FOREVER), n);
        }
    }
    CHECK_EQ(circuit_bytes_received(pr->c[1]), at);
}

static void test_stream_wrap(void)
{
    static uint8_t copy[RING];
    for (uint64_t at = RING - 100; at < 4 * RING; at += RING + 1) {
        struct pair pr;
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        advance(&pr, at);
        uint8_t *txb = circuit_area_base(pr.c[0], 0);
        uint8_t *rxb = circuit_area_base(pr.c[1], 1);
        uint64_t off = at & (RING - 1);
        void *w, *r;
        /* The whole ring as one span, starting before its end. */
        CHECK_EQ(circuit_reserve(pr.c[0], RING, 0, CIRCUIT_FOREVER, &w), RING);
        CHECK(w == txb + off);
        fill(w, 7, RING);
        CHECK_EQ(circuit_commit(pr.c[0], RING), 0);
        CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), RING);
        CHECK(r == rxb + off);
        CHECK(matches(r, 7, RING));
        /* The part past the end landed at the start of the area. */
        CHECK(matches(rxb, 7 + RING - off, off));
        CHECK_EQ(circuit_consume(pr.c[1], RING), 0);

        /* Copying calls across the same wrap agree with the views. */
        fill(copy, 99, RING);
        CHECK_EQ(circuit_send(pr.c[0], copy, RING, 0, CIRCUIT_FOREVER), RING);
        CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), RING);
        CHECK(matches(r, 99, RING));
        memset(copy, 0, sizeof(copy));
        CHECK_EQ(circuit_recv(pr.c[1], copy, RING, 0, CIRCUIT_FOREVER), RING);
        CHECK(matches(copy, 99, RING));
        CHECK_EQ(circuit_bytes_received(pr.c[1]), at + 2 * RING);
        pair_close(&pr);
    }
    OK("stream_span_across_wrap");
}

static void test_stream_cancel(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    void *w, *r;
    char buf[16];
    /* Commit needs a reservation, and no more than it. */
    CHECK_EQ(circuit_commit(pr.c[0], 1), -EINVAL);
    CHECK_EQ(circuit_reserve(pr.c[0], 0, 0, CIRCUIT_FOREVER, &w), RING);
    CHECK_EQ(circuit_commit(pr.c[0], RING + 1), -EINVAL);
    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &r), -EAGAIN);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), 0);
    /* A send in between cancels the reservation. */
    CHECK_EQ(circuit_reserve(pr.c[0], 4, 0, CIRCUIT_FOREVER, &w), RING);
    CHECK_EQ(circuit_send(pr.c[0], "xy", 2, 0, CIRCUIT_FOREVER), 2);
    CHECK_EQ(circuit_commit(pr.c[0], 1), -EINVAL);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), 2);
    /* A later reservation replaces an earlier one. */
    CHECK_EQ(circuit_reserve(pr.c[0], 4, 0, CIRCUIT_FOREVER, &w), RING - 2);
    CHECK_EQ(circuit_reserve(pr.c[0], 4, 0, CIRCUIT_FOREVER, &w), RING - 2);
    memcpy(w, "z", 1);
    CHECK_EQ(circuit_commit(pr.c[0], 1), 0);
    /* A recv in between cancels a peek. */
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 3);
    CHECK_EQ(circuit_recv(pr.c[1], buf, 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_consume(pr.c[1], 1), -EINVAL);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 2);
    CHECK(memcmp(r, "yz", 2) == 0);
    CHECK_EQ(circuit_consume(pr.c[1], 2), 0);
    CHECK_EQ(circuit_bytes_received(pr.c[1]), 3);
    pair_close(&pr);
    OK("stream_misuse_einval");
}

static void test_dgram_basic(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    void *w, *r;
    uint8_t *txb = circuit_area_base(pr.c[0], 0);
    CHECK_EQ(circuit_max_dgram(pr.c[0]), RING - 8);
    CHECK_EQ(circuit_reserve(pr.c[0], 5, 0, CIRCUIT_FOREVER, &w), RING - 8);
    CHECK(w == txb + 8); /* after the record header */
    memcpy(w, "hello", 5);
    CHECK_EQ(circuit_commit(pr.c[0], 5), 0);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), 16); /* header + payload padded to 8 */
    struct circuit_record h;
    memcpy(&h, txb, sizeof(h));
    CHECK_EQ(h.len, 5);
    CHECK_EQ(h.reserved, 0);

    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 5);
    CHECK(r == (uint8_t *)circuit_area_base(pr.c[1], 1) + 8);
    CHECK(memcmp(r, "hello", 5) == 0);
    /* A datagram is consumed whole or not at all. */
    CHECK_EQ(circuit_consume(pr.c[1], 4), -EINVAL);
    CHECK_EQ(circuit_consume(pr.c[1], 6), -EINVAL);
    CHECK_EQ(circuit_consume(pr.c[1], 0), -EINVAL);
    CHECK_EQ(circuit_consume(pr.c[1], 5), 0);
    CHECK_EQ(circuit_consume(pr.c[1], 5), -EINVAL);
    CHECK_EQ(circuit_bytes_received(pr.c[1]), 16);

    /* Peek shows one datagram at a time. */
    CHECK_EQ(circuit_send(pr.c[0], "one", 3, 0, CIRCUIT_FOREVER), 3);
    CHECK_EQ(circuit_send(pr.c[0], "three", 5, 0, CIRCUIT_FOREVER), 5);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 3);
    CHECK(memcmp(r, "one", 3) == 0);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 3); /* again, same */
    CHECK_EQ(circuit_consume(pr.c[1], 3), 0);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 5);
    CHECK(memcmp(r, "three", 5) == 0);
    CHECK_EQ(circuit_consume(pr.c[1], 5), 0);
    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &r), -EAGAIN);

    /* An empty datagram, by reserve/commit, seen by peek/consume. */
    CHECK_EQ(circuit_reserve(pr.c[0], 0, 0, CIRCUIT_FOREVER, &w), RING - 8);
    CHECK_EQ(circuit_commit(pr.c[0], 0), 0);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 0);
    CHECK_EQ(circuit_consume(pr.c[1], 0), 0);

    /* Too big for the ring, ever. */
    CHECK_EQ(circuit_reserve(pr.c[0], RING - 7, 0, CIRCUIT_FOREVER, &w), -EMSGSIZE);
    CHECK_EQ(circuit_reserve(pr.c[0], RING - 8, 0, CIRCUIT_FOREVER, &w), RING - 8);
    CHECK_EQ(circuit_commit(pr.c[0], RING - 8), 0);
    CHECK_EQ(circuit_reserve(pr.c[0], 0, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &w), -EAGAIN);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), RING - 8);
    CHECK_EQ(circuit_consume(pr.c[1], RING - 8), 0);
    pair_close(&pr);
    OK("dgram_reserve_commit_peek_consume");
}

static void test_dgram_wrap(void)
{
    static uint8_t copy[RING];
    /* Start points: record header just before the end, payload crossing it;
     * and a maximal datagram starting mid-ring. */
    static const uint64_t starts[] = {RING - 8, RING - 16, RING - 24, RING / 2 + 8,
                                      3 * RING - 40};
    static const size_t lens[] = {100, RING - 8, 17, RING - 8, 1000};
    for (int i = 0; i < 5; i++) {
        struct pair pr;
        pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
        advance(&pr, starts[i]);
        uint64_t off = starts[i] & (RING - 1);
        uint8_t *txb = circuit_area_base(pr.c[0], 0);
        uint8_t *rxb = circuit_area_base(pr.c[1], 1);
        void *w, *r;
        CHECK_EQ(circuit_reserve(pr.c[0], lens[i], 0, CIRCUIT_FOREVER, &w), RING - 8);
        CHECK(w == txb + ((off + 8) & (RING - 1)));
        fill(w, 3 * i, lens[i]);
        CHECK_EQ(circuit_commit(pr.c[0], lens[i]), 0);
        CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), lens[i]);
        CHECK(r == rxb + ((off + 8) & (RING - 1)));
        CHECK(matches(r, 3 * i, lens[i]));
        CHECK_EQ(circuit_consume(pr.c[1], lens[i]), 0);

        /* The copying calls across the same wrap. */
        fill(copy, 5 * i, lens[i]);
        CHECK_EQ(circuit_send(pr.c[0], copy, lens[i], 0, CIRCUIT_FOREVER), lens[i]);
        memset(copy, 0, sizeof(copy));
        CHECK_EQ(circuit_recv(pr.c[1], copy, sizeof(copy), 0, CIRCUIT_FOREVER), lens[i]);
        CHECK(matches(copy, 5 * i, lens[i]));
        pair_close(&pr);
    }
    OK("dgram_span_across_wrap");
}

static void test_dgram_cancel(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    void *w, *r;
    char buf[16];
    /* No reservation: nothing to commit, not even an empty datagram. */
    CHECK_EQ(circuit_commit(pr.c[0], 0), -EINVAL);
    CHECK_EQ(circuit_commit(pr.c[0], 1), -EINVAL);
    /* Beyond the reservation. */
    CHECK_EQ(circuit_reserve(pr.c[0], 8, 0, CIRCUIT_FOREVER, &w), RING - 8);
    CHECK_EQ(circuit_commit(pr.c[0], RING - 7), -EINVAL);
    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &r), -EAGAIN);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), 0);
    /* A send in between cancels the reservation; only the send arrives. */
    CHECK_EQ(circuit_reserve(pr.c[0], 8, 0, CIRCUIT_FOREVER, &w), RING - 8);
    CHECK_EQ(circuit_send(pr.c[0], "sent", 4, 0, CIRCUIT_FOREVER), 4);
    CHECK_EQ(circuit_commit(pr.c[0], 1), -EINVAL);
    CHECK_EQ(circuit_commit(pr.c[0], 0), -EINVAL);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), 16);
    /* A recv in between cancels a peek. */
    CHECK_EQ(circuit_send(pr.c[0], "second", 6, 0, CIRCUIT_FOREVER), 6);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 4);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 4);
    CHECK(memcmp(buf, "sent", 4) == 0);
    CHECK_EQ(circuit_consume(pr.c[1], 4), -EINVAL);
    CHECK_EQ(circuit_consume(pr.c[1], 6), -EINVAL);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 6);
    CHECK(memcmp(r, "second", 6) == 0);
    CHECK_EQ(circuit_consume(pr.c[1], 6), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
             -EAGAIN);
    pair_close(&pr);
    OK("dgram_misuse_einval");
}

/* Room for exactly one more record header: an empty datagram still fits,
 * and reserve/commit must be able to send it, as send can. */
static void test_dgram_last_slot(void)
{
    static uint8_t junk[RING];
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    void *w, *r;
    CHECK_EQ(circuit_send(pr.c[0], junk, RING - 16, 0, CIRCUIT_FOREVER), RING - 16);
    CHECK_EQ(circuit_reserve(pr.c[0], 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &w), -EAGAIN);
    CHECK_EQ(circuit_reserve(pr.c[0], 0, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &w), 0);
    CHECK_EQ(circuit_commit(pr.c[0], 1), -EINVAL);
    CHECK_EQ(circuit_commit(pr.c[0], 0), 0);
    CHECK_EQ(circuit_bytes_sent(pr.c[0]), RING);
    CHECK_EQ(circuit_reserve(pr.c[0], 0, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &w), -EAGAIN);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), RING - 16);
    CHECK_EQ(circuit_consume(pr.c[1], RING - 16), 0);
    CHECK_EQ(circuit_peek(pr.c[1], 0, CIRCUIT_FOREVER, &r), 0);
    CHECK_EQ(circuit_consume(pr.c[1], 0), 0);
    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &r), -EAGAIN);
    pair_close(&pr);
    OK("dgram_empty_into_last_slot");
}

int main(void)
{
    alarm(30);
    test_mirror();
    test_stream_basic();
    test_stream_wrap();
    test_stream_cancel();
    test_dgram_basic();
    test_dgram_wrap();
    test_dgram_cancel();
    test_dgram_last_slot();
    return 0;
}
