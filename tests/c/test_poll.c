/*
 * test_poll.c - readiness for poll-style callers: circuit_poll's masks in
 * every state of a conversation, and circuit_arm_read making the doorbell
 * (an eventfd) readable exactly when there is something to do.
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
        pair_open(&pr, kind, RING, RING, 0);
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
    pair_open(&pr, CIRCUIT_STREAM, RING, RING, 0);
    CHECK_EQ(circuit_abort(pr.c[1]), 0);
    CHECK_EQ(circuit_poll(pr.c[0]), R | W | H);
    pair_close(&pr);
    /* Death: the link, and nothing else, tells. */
    pair_open(&pr, CIRCUIT_STREAM, RING, RING, PAIR_KEEP_LINK1);
    CHECK_EQ(circuit_poll(pr.c[0]), W);
    close(pr.link1);
    pr.link1 = -1;
    CHECK_EQ(circuit_poll(pr.c[0]), R | W | H);
    pair_close(&pr);
    /* Death with data still in the ring: the data is readable either way. */
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING, PAIR_KEEP_LINK1);
    CHECK_EQ(circuit_send(pr.c[1], "x", 1, 0, CIRCUIT_FOREVER), 1);
    close(pr.link1);
    pr.link1 = -1;
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
        pair_open(&pr, kind, RING, RING, 0);
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

    /* A peer's death is found by arming (the link), and told by the bell. */
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING, PAIR_KEEP_LINK1);
    const int bell = circuit_bell(pr.c[0]);
    CHECK_EQ(circuit_arm_read(pr.c[0]), 0);
    CHECK(!fd_readable(bell));
    close(pr.link1);
    pr.link1 = -1;
    CHECK_EQ(circuit_arm_read(pr.c[0]), R);
    CHECK(fd_readable(bell));
    pair_close(&pr);
    OK("arm_read_doorbell");
}

int main(void)
{
    alarm(30);
    test_masks();
    test_masks_on_reset();
    test_arm_read();
    return 0;
}
