/*
 * harness.h - shared helpers of the C core's tests: a pair of endpoints in
 * one process, a raw "peer" mapping of the object, checks that stop the test.
 */
#ifndef CIRCUITS_TEST_HARNESS_H
#define CIRCUITS_TEST_HARNESS_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "circuit.h"

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,   \
                    #cond);                                                    \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

#define CHECK_EQ(a, b)                                                         \
    do {                                                                       \
        long long a_ = (long long)(a), b_ = (long long)(b);                    \
        if (a_ != b_) {                                                        \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld != %lld)\n", \
                    __FILE__, __LINE__, #a, #b, a_, b_);                       \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

#define OK(name) (printf("ok %s\n", (name)), fflush(stdout))

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t in_ms(int64_t ms) { return now_ns() + ms * 1000000LL; }

static inline void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Bytes of a test stream: a function of the absolute index, never periodic
 * at a power of two, so a misplaced or repeated chunk shows. */
static inline uint8_t pattern(uint64_t i)
{
    return (uint8_t)((i * 2654435761u) >> 13 ^ (i / 251));
}

/* n bytes of the test stream from absolute index `start`. */
static inline void fill(uint8_t *buf, uint64_t start, size_t n)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = pattern(start + i);
}

/* xorshift64*: reproducible randomness from a printed seed. */
static inline uint64_t rnd(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/*
 * Two endpoints built as circuits/ring/__init__.py endpoint_fds() builds
 * them: doorbell s is a socket pair (X_s, Y_s); side s gets
 * {bell X_s, self_bell Y_s, peer_bell dup(Y_{1-s})}.  The sockets are left
 * blocking, as Python's socketpair() makes them: the core must never rely
 * on O_NONBLOCK (it is in descriptions the peer shares).  The endpoints own
 * every one of these fds; the numbers are kept here only to look at them,
 * or to play the peer with them (never close them here).
 */
struct pair {
    struct circuit *c[2];
    int memfd;           /* the object; still open, for raw mappings */
    int bell[2];         /* X_s: side s sleeps on it; only side s holds it */
    int self_bell[2];    /* Y_s: side s rings itself with it */
    int peer_bell[2];    /* side s's dup of Y_{1-s}: it rings side 1 - s */
    struct circuit_params p;
};

static inline void pair_open(struct pair *pr, uint32_t kind, uint64_t size0,
                             uint64_t size1)
{
    memset(pr, 0, sizeof(*pr));
    pr->p.kind = kind;
    pr->p.size[0] = size0;
    pr->p.size[1] = size1;
    pr->memfd = circuit_create(&pr->p);
    CHECK(pr->memfd >= 0);
    for (int s = 0; s < 2; s++) {
        int sv[2];
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        pr->bell[s] = sv[0];
        pr->self_bell[s] = sv[1];
    }
    for (int s = 0; s < 2; s++) {
        pr->peer_bell[s] = fcntl(pr->self_bell[1 - s], F_DUPFD_CLOEXEC, 0);
        CHECK(pr->peer_bell[s] >= 0);
    }
    for (int s = 0; s < 2; s++) {
        struct circuit_fds f = {.bell = pr->bell[s], .self_bell = pr->self_bell[s],
                                .peer_bell = pr->peer_bell[s]};
        CHECK_EQ(circuit_attach(pr->memfd, &f, &pr->p, s, &pr->c[s]), 0);
        CHECK_EQ(circuit_side(pr->c[s]), s);
        CHECK_EQ(circuit_bell(pr->c[s]), pr->bell[s]);
    }
}

/* Side s vanishes without a word: its fds close, its state stays. */
static inline void pair_vanish(struct pair *pr, int s)
{
    CHECK_EQ(circuit_detach(pr->c[s]), 0);
}

static inline void pair_close(struct pair *pr)
{
    circuit_free(pr->c[0]);
    circuit_free(pr->c[1]);
    close(pr->memfd);
    memset(pr, 0, sizeof(*pr));
}

/* The whole object mapped once more, as a peer (or anyone holding the fd) may. */
static inline uint8_t *raw_map(const struct pair *pr)
{
    uint64_t total = circuit_object_size(&pr->p);
    void *m = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, pr->memfd, 0);
    CHECK(m != MAP_FAILED);
    return m;
}

static inline void raw_unmap(const struct pair *pr, uint8_t *m)
{
    munmap(m, circuit_object_size(&pr->p));
}

static inline struct circuit_header *raw_hdr(uint8_t *m)
{
    return (struct circuit_header *)m;
}

static inline struct circuit_dir_ctrl *raw_dir(uint8_t *m, int dir)
{
    return &((struct circuit_ctrl *)(m + CIRCUIT_CTRL_OFFSET))->dir[dir];
}

static inline uint8_t *raw_data(const struct pair *pr, uint8_t *m, int dir)
{
    return m + CIRCUIT_DATA_OFFSET + (dir ? pr->p.size[0] : 0);
}

/* Rings queued on a doorbell (one byte each), without taking them. */
static inline int bell_count(int fd)
{
    int n = -1;
    CHECK(ioctl(fd, FIONREAD, &n) == 0);
    CHECK(n >= 0);
    return n;
}

/* The rings queued on a doorbell, taken (drained); 0 if it was not rung. */
static inline uint64_t bell_take(int fd)
{
    uint64_t total = 0;
    char buf[256];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0) {
            CHECK(errno == EAGAIN || errno == EWOULDBLOCK);
            return total;
        }
        CHECK(n > 0); /* 0: the ringing end was shut, not expected here */
        total += (uint64_t)n;
    }
}

/* Ring a doorbell through a ringing end, as a side (or a liar) does. */
static inline void bell_ring(int fd)
{
    static const char ding = 1;
    CHECK(send(fd, &ding, 1, MSG_DONTWAIT | MSG_NOSIGNAL) == 1);
}

static inline int fd_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = poll(&p, 1, 0);
    CHECK(n >= 0);
    return n > 0 && (p.revents & POLLIN);
}

/* Scheduler state of a thread of ours ('R', 'S', ...), from /proc. */
static inline char thread_state(pid_t tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return '?';
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' ? p[2] : '?';
}

/* Whether thread tid is asleep in the kernel within ms, and stays asleep. */
static inline int asleep_within(pid_t tid, int ms)
{
    for (int i = 0; i < ms; i++) {
        if (thread_state(tid) == 'S') {
            sleep_ms(20); /* and stays asleep: not a passing page fault */
            if (thread_state(tid) == 'S')
                return 1;
        }
        sleep_ms(1);
    }
    return 0;
}

/* Wait until thread tid sleeps in the kernel (bounded by the test's alarm). */
static inline void wait_sleeping(pid_t tid)
{
    while (thread_state(tid) != 'S')
        sleep_ms(1);
    sleep_ms(20); /* and stays asleep: not a passing page fault */
    while (thread_state(tid) != 'S')
        sleep_ms(1);
}

#endif
