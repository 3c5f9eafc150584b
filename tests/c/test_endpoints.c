/*
 * test_endpoints.c - circuit_create_endpoints(): both sides' descriptors in
 * one call, wired as bell.c says (each side rings the other and itself),
 * the mirror mapping of the one-span attach, and circuit_ring_end_alive()
 * telling a creator when a side is gone; circuit_make(), the same circuit
 * in five descriptors for a creator that sends them.
 */
#include <stdbool.h>

#include "harness.h"

static struct circuit *attach_side(const int fds[4], const struct circuit_params *p, int side)
{
    struct circuit_fds f = {.bell = fds[1], .self_bell = fds[2], .peer_bell = fds[3]};
    struct circuit *c = NULL;
    CHECK_EQ(circuit_attach(fds[0], &f, p, side, &c), 0);
    return c;
}

static bool readable(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

static void test_descriptors_are_new_and_cloexec(void)
{
    struct circuit_params p = {.kind = CIRCUIT_STREAM, .size = {4096, 8192}};
    int s0[4], s1[4];
    CHECK_EQ(circuit_create_endpoints(&p, s0, s1), 0);
    for (int i = 0; i < 4; i++) {
        CHECK(fcntl(s0[i], F_GETFD) & FD_CLOEXEC);
        CHECK(fcntl(s1[i], F_GETFD) & FD_CLOEXEC);
        for (int j = 0; j < 4; j++) {
            CHECK(s0[i] != s1[j]);
            CHECK(i == j || s0[i] != s0[j]);
        }
    }
    /* side 0's peer_bell rings side 1's bell, and the other way round */
    CHECK_EQ(write(s0[3], "a", 1), 1);
    CHECK(readable(s1[1]) && !readable(s0[1]));
    CHECK_EQ(write(s1[3], "b", 1), 1);
    CHECK(readable(s0[1]));
    /* self_bell rings one's own bell */
    char buf[4];
    CHECK_EQ(read(s0[1], buf, sizeof(buf)), 1);
    CHECK_EQ(write(s0[2], "c", 1), 1);
    CHECK(readable(s0[1]));
    for (int i = 0; i < 4; i++) {
        close(s0[i]);
        close(s1[i]);
    }
    OK("descriptors are new, close-on-exec and wired");
}

static void test_bytes_cross_both_ways_over_the_wrap(void)
{
    struct circuit_params p = {.kind = CIRCUIT_STREAM, .size = {4096, 16384}};
    int s0[4], s1[4];
    CHECK_EQ(circuit_create_endpoints(&p, s0, s1), 0);
    struct circuit *a = attach_side(s0, &p, 0), *b = attach_side(s1, &p, 1);
    char out[3000], in[3000];
    for (int round = 0; round < 40; round++) { /* 120 KB: many wraps of both areas */
        for (size_t i = 0; i < sizeof(out); i++)
            out[i] = (char)(i * 7 + round);
        CHECK_EQ(circuit_send(a, out, sizeof(out), CIRCUIT_NONBLOCK, -1), sizeof(out));
        CHECK_EQ(circuit_recv(b, in, sizeof(in), CIRCUIT_NONBLOCK, -1), sizeof(in));
        CHECK(memcmp(in, out, sizeof(in)) == 0);
        CHECK_EQ(circuit_send(b, out, sizeof(out), CIRCUIT_NONBLOCK, -1), sizeof(out));
        CHECK_EQ(circuit_recv(a, in, sizeof(in), CIRCUIT_NONBLOCK, -1), sizeof(in));
        CHECK(memcmp(in, out, sizeof(in)) == 0);
    }
    /* the mirror: both halves of each area show the same bytes */
    for (int dir = 0; dir < 2; dir++) {
        uint8_t *base = circuit_area_base(a, dir);
        uint64_t size = circuit_area_size(a, dir);
        CHECK(memcmp(base, base + size, size) == 0);
    }
    circuit_free(a);
    circuit_free(b);
    OK("bytes cross both ways over the wrap");
}

static void test_ring_end_alive_until_the_side_is_gone(void)
{
    struct circuit_params p = {.kind = CIRCUIT_DGRAM, .size = {4096, 4096}};
    int s0[4], s1[4];
    CHECK_EQ(circuit_create_endpoints(&p, s0, s1), 0);
    int watch0 = dup(s0[2]); /* what the operator keeps: each side's ringing end */
    CHECK(watch0 >= 0);
    CHECK_EQ(circuit_ring_end_alive(watch0), 1);
    /* a side ringing itself a lot is alive, and never blocks us */
    int fl = fcntl(s0[2], F_GETFL);
    CHECK(fcntl(s0[2], F_SETFL, fl & ~O_NONBLOCK) == 0); /* shared description */
    int queued = 0; /* until its socket buffer is full */
    while (send(s0[1], "x", 1, MSG_DONTWAIT) == 1)
        queued++;
    CHECK(queued > 8 && errno == EAGAIN);
    CHECK_EQ(circuit_ring_end_alive(watch0), 1);
    for (int i = 0; i < 20; i++)
        circuit_ring_end_alive(watch0); /* drained, then nothing to read */
    CHECK_EQ(circuit_ring_end_alive(watch0), 1);
    close(s0[1]); /* side 0's bell: only side 0 ever holds it */
    CHECK_EQ(circuit_ring_end_alive(watch0), 0);
    close(watch0);
    for (int i = 0; i < 4; i++) {
        if (i != 1)
            close(s0[i]);
        close(s1[i]);
    }
    OK("ring end alive until the side is gone");
}

static void test_make_hands_both_sides_the_shared_descriptors(void)
{
    struct circuit_params p = {.kind = CIRCUIT_STREAM, .size = {4096, 4096}};
    struct circuit_made m;
    CHECK_EQ(circuit_make(&p, &m), 0);
    int all[5] = {m.memfd, m.bell[0], m.ring[0], m.bell[1], m.ring[1]};
    for (int i = 0; i < 5; i++) {
        CHECK(fcntl(all[i], F_GETFD) & FD_CLOEXEC);
        for (int j = 0; j < i; j++)
            CHECK(all[i] != all[j]);
    }
    /* side s is sent [memfd, bell[s], ring[s], ring[1-s]]; what it receives
     * are copies (SCM_RIGHTS), which attach then owns */
    int s0[4] = {dup(m.memfd), dup(m.bell[0]), dup(m.ring[0]), dup(m.ring[1])};
    int s1[4] = {dup(m.memfd), dup(m.bell[1]), dup(m.ring[1]), dup(m.ring[0])};
    struct circuit *a = attach_side(s0, &p, 0), *b = attach_side(s1, &p, 1);
    char in[5];
    CHECK_EQ(circuit_send(a, "hello", 5, CIRCUIT_NONBLOCK, -1), 5);
    CHECK_EQ(circuit_recv(b, in, 5, CIRCUIT_NONBLOCK, -1), 5);
    CHECK(memcmp(in, "hello", 5) == 0);
    CHECK_EQ(circuit_send(b, "olleh", 5, CIRCUIT_NONBLOCK, -1), 5);
    CHECK_EQ(circuit_recv(a, in, 5, CIRCUIT_NONBLOCK, -1), 5);
    CHECK(memcmp(in, "olleh", 5) == 0);
    circuit_free(a);
    circuit_free(b);
    /* a side's bell closed (it is gone): its ringing end hangs up, the other's not */
    close(m.bell[0]);
    CHECK_EQ(circuit_ring_end_alive(m.ring[0]), 0);
    CHECK_EQ(circuit_ring_end_alive(m.ring[1]), 1);
    close(m.bell[1]);
    CHECK_EQ(circuit_ring_end_alive(m.ring[1]), 0);
    close(m.memfd);
    close(m.ring[0]);
    close(m.ring[1]);
    OK("make hands both sides the shared descriptors");
}

int main(void)
{
    alarm(30);
    test_descriptors_are_new_and_cloexec();
    test_bytes_cross_both_ways_over_the_wrap();
    test_ring_end_alive_until_the_side_is_gone();
    test_make_hands_both_sides_the_shared_descriptors();
    return 0;
}
