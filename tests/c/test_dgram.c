/*
 * test_dgram.c - datagrams: boundaries kept, sizes at the record alignment
 * and at the ring's limit, truncation, and many records through the wrap.
 */
#include "harness.h"

#define RING 4096u

static uint64_t record(uint64_t len) { return 8 + ((len + 7) & ~7ull); }

/* A datagram's bytes: the test stream from a point its seed picks. */
static void fill_dgram(uint8_t *buf, uint64_t seed, size_t n) { fill(buf, seed * 7919, n); }

static int matches(const uint8_t *buf, uint64_t seed, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (buf[i] != pattern(seed * 7919 + i))
            return 0;
    return 1;
}

static void test_sizes(void)
{
    static uint8_t out[2 * RING], in[2 * RING + 16];
    /* Direction 0 has the small ring, direction 1 the large one. */
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, 2 * RING);
    CHECK_EQ(circuit_max_dgram(pr.c[0]), RING - 8);
    CHECK_EQ(circuit_max_dgram(pr.c[1]), 2 * RING - 8);
    for (int s = 0; s < 2; s++) {
        struct circuit *tx = pr.c[s], *rx = pr.c[1 - s];
        const size_t max = circuit_max_dgram(tx);
        const size_t sizes[] = {0, 1, 7, 8, 9, 15, 16, 17, 255, 1000, max - 9, max - 8,
                                max - 1, max};
        uint64_t before = circuit_bytes_sent(tx);
        for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
            size_t n = sizes[i];
            fill_dgram(out, i + 1, n);
            CHECK_EQ(circuit_send(tx, out, n, 0, CIRCUIT_FOREVER), n);
            CHECK_EQ(circuit_bytes_sent(tx) - before, record(n));
            before = circuit_bytes_sent(tx);
            memset(in, 0xee, sizeof(in));
            CHECK_EQ(circuit_recv(rx, in, sizeof(in), 0, CIRCUIT_FOREVER), n);
            CHECK(matches(in, i + 1, n));
            CHECK_EQ(in[n], 0xee); /* nothing past the datagram */
            CHECK_EQ(circuit_recv(rx, in, sizeof(in), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
                     -EAGAIN);
        }
        /* One byte too many can never fit: not EAGAIN, EMSGSIZE. */
        CHECK_EQ(circuit_send(tx, out, max + 1, 0, CIRCUIT_FOREVER), -EMSGSIZE);
        CHECK_EQ(circuit_send(tx, out, max + 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EMSGSIZE);
        CHECK_EQ(circuit_send(tx, out, max + 8, 0, CIRCUIT_FOREVER), -EMSGSIZE);
        CHECK_EQ(circuit_send(tx, out, (size_t)-1, 0, CIRCUIT_FOREVER), -EMSGSIZE);
        CHECK_EQ(circuit_send(tx, out, (size_t)1 << 33, 0, CIRCUIT_FOREVER), -EMSGSIZE);
        void *w;
        CHECK_EQ(circuit_reserve(tx, max + 1, 0, CIRCUIT_FOREVER, &w), -EMSGSIZE);
        CHECK_EQ(circuit_recv(rx, in, sizeof(in), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
        /* A maximal datagram fills the ring exactly. */
        CHECK_EQ(circuit_send(tx, out, max, 0, CIRCUIT_FOREVER), max);
        CHECK_EQ(circuit_send(tx, out, 0, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
        CHECK_EQ(circuit_recv(rx, in, sizeof(in), 0, CIRCUIT_FOREVER), max);
    }
    pair_close(&pr);
    OK("sizes_0_1_7_8_9_max");
}

static void test_boundaries(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    char buf[64];
    /* Several datagrams waiting come out one per call, never merged. */
    CHECK_EQ(circuit_send(pr.c[0], "a", 1, 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(circuit_send(pr.c[0], "", 0, 0, CIRCUIT_FOREVER), 0);
    CHECK_EQ(circuit_send(pr.c[0], "bcdefghij", 9, 0, CIRCUIT_FOREVER), 9);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 1);
    CHECK_EQ(buf[0], 'a');
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 0);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), CIRCUIT_ALL, CIRCUIT_FOREVER), 9);
    CHECK(memcmp(buf, "bcdefghij", 9) == 0);
    /* A full ring refuses the record that does not fit whole. */
    static uint8_t big[RING];
    CHECK_EQ(circuit_send(pr.c[0], big, RING - 40, 0, CIRCUIT_FOREVER), RING - 40);
    CHECK_EQ(circuit_send(pr.c[0], big, 25, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(circuit_send(pr.c[0], big, 24, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), 24);
    CHECK_EQ(circuit_send(pr.c[0], big, 0, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    CHECK_EQ(circuit_send(pr.c[0], big, 1, 0, in_ms(10)), -ETIMEDOUT);
    CHECK_EQ(circuit_recv(pr.c[1], big, sizeof(big), 0, CIRCUIT_FOREVER), RING - 40);
    CHECK_EQ(circuit_recv(pr.c[1], big, sizeof(big), 0, CIRCUIT_FOREVER), 24);
    /* The end comes after the last datagram. */
    CHECK_EQ(circuit_send(pr.c[0], "fin", 3, 0, CIRCUIT_FOREVER), 3);
    CHECK_EQ(circuit_shutdown_write(pr.c[0]), 0);
    CHECK_EQ(circuit_send(pr.c[0], "x", 1, 0, CIRCUIT_FOREVER), -EPIPE);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 3);
    CHECK_EQ(circuit_recv(pr.c[1], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    pair_close(&pr);
    OK("boundaries_kept");
}

static void test_truncation(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    uint8_t out[300], in[300];
    fill_dgram(out, 42, sizeof(out));
    CHECK_EQ(circuit_send(pr.c[0], out, 300, 0, CIRCUIT_FOREVER), 300);
    CHECK_EQ(circuit_send(pr.c[0], out, 20, 0, CIRCUIT_FOREVER), 20);
    CHECK_EQ(circuit_send(pr.c[0], out, 5, 0, CIRCUIT_FOREVER), 5);
    CHECK_EQ(circuit_send(pr.c[0], out, 5, 0, CIRCUIT_FOREVER), 5);
    memset(in, 0xcc, sizeof(in));
    /* Full length reported, only the buffer's worth copied, datagram gone. */
    CHECK_EQ(circuit_recv(pr.c[1], in, 10, 0, CIRCUIT_FOREVER), 300);
    CHECK(matches(in, 42, 10));
    for (size_t i = 10; i < sizeof(in); i++)
        CHECK_EQ(in[i], 0xcc);
    memset(in, 0xcc, sizeof(in));
    CHECK_EQ(circuit_recv(pr.c[1], in, 19, 0, CIRCUIT_FOREVER), 20);
    CHECK(matches(in, 42, 19));
    CHECK_EQ(in[19], 0xcc);
    /* A zero-length buffer discards the datagram and still tells its size. */
    memset(in, 0xcc, sizeof(in));
    CHECK_EQ(circuit_recv(pr.c[1], in, 0, 0, CIRCUIT_FOREVER), 5);
    CHECK_EQ(in[0], 0xcc);
    CHECK_EQ(circuit_recv(pr.c[1], NULL, 0, 0, CIRCUIT_FOREVER), 5);
    CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN);
    /* Empty datagrams from a NULL buffer. */
    CHECK_EQ(circuit_send(pr.c[0], NULL, 0, 0, CIRCUIT_FOREVER), 0);
    CHECK_EQ(circuit_recv(pr.c[1], NULL, 0, 0, CIRCUIT_FOREVER), 0);
    pair_close(&pr);
    OK("truncation");
}

/* Thousands of datagrams of varied sizes, many times around the ring. */
static void test_many(void)
{
    static uint8_t out[RING], in[RING];
    for (int round = 0; round < 2; round++) {
        uint64_t seed = 0x9e3779b97f4a7c15ull + (uint64_t)round;
        struct pair pr;
        pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
        const size_t cap = round ? RING - 8 : 600;
        uint64_t sent = 0, got = 0, bytes = 0;
        size_t lens[64]; /* lengths in flight, by sequence number mod 64 */
        while (got < 20000) {
            /* Send a burst until the ring refuses one. */
            for (;;) {
                size_t n = (size_t)(rnd(&seed) % (cap + 1));
                if (rnd(&seed) % 4 == 0)
                    n = (size_t)(rnd(&seed) % 17);
                if (sent - got == 64)
                    break;
                fill_dgram(out, sent, n);
                ssize_t rc = circuit_send(pr.c[0], out, n, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER);
                if (rc == -EAGAIN)
                    break;
                CHECK_EQ(rc, n);
                lens[sent % 64] = n;
                bytes += record(n);
                sent++;
            }
            CHECK_EQ(circuit_bytes_sent(pr.c[0]), bytes);
            CHECK(bytes - circuit_bytes_received(pr.c[1]) <= RING);
            /* Receive some of them, some by peek. */
            CHECK(sent > got);
            uint64_t take = 1 + rnd(&seed) % (sent - got);
            while (take--) {
                size_t want = lens[got % 64];
                if (rnd(&seed) & 1) {
                    void *r;
                    CHECK_EQ(circuit_peek(pr.c[1], CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &r),
                             want);
                    CHECK(matches(r, got, want));
                    CHECK_EQ(circuit_consume(pr.c[1], want), 0);
                } else {
                    CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), CIRCUIT_NONBLOCK,
                                          CIRCUIT_FOREVER), want);
                    CHECK(matches(in, got, want));
                }
                got++;
            }
        }
        while (got < sent) {
            CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), 0, CIRCUIT_FOREVER), lens[got % 64]);
            CHECK(matches(in, got, lens[got % 64]));
            got++;
        }
        CHECK_EQ(circuit_bytes_received(pr.c[1]), bytes);
        CHECK(bytes > 20 * RING);
        CHECK_EQ(circuit_recv(pr.c[1], in, sizeof(in), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
                 -EAGAIN);
        pair_close(&pr);
    }
    OK("many_through_wrap");
}

int main(void)
{
    alarm(30);
    test_sizes();
    test_boundaries();
    test_truncation();
    test_many();
    return 0;
}
