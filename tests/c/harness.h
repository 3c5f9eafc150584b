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
#include <sys/eventfd.h>
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

/* Keep side 1's link end in the harness (the endpoint gets none), so a test
 * can close it to play side 1's death without changing any state. */
#define PAIR_KEEP_LINK1 1

struct pair {
    struct circuit *c[2];
    int memfd;           /* the object; still open, for raw mappings */
    int link1;           /* side 1's link end with PAIR_KEEP_LINK1, else -1 */
    struct circuit_params p;
};

static inline void pair_open(struct pair *pr, uint32_t kind, uint64_t size0,
                             uint64_t size1, int flags)
{
    memset(pr, 0, sizeof(*pr));
    pr->p.kind = kind;
    pr->p.size[0] = size0;
    pr->p.size[1] = size1;
    pr->memfd = circuit_create(&pr->p);
    CHECK(pr->memfd >= 0);
    int bell0 = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int bell1 = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int link[2];
    CHECK(bell0 >= 0 && bell1 >= 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, link) == 0);
    pr->link1 = -1;
    if (flags & PAIR_KEEP_LINK1) {
        pr->link1 = link[1];
        link[1] = -1;
    }
    struct circuit_fds f0 = {.bell = bell0, .peer_bell = dup(bell1), .link = link[0]};
    struct circuit_fds f1 = {.bell = bell1, .peer_bell = dup(bell0), .link = link[1]};
    CHECK(f0.peer_bell >= 0 && f1.peer_bell >= 0);
    CHECK_EQ(circuit_attach(pr->memfd, &f0, &pr->p, 0, &pr->c[0]), 0);
    CHECK_EQ(circuit_attach(pr->memfd, &f1, &pr->p, 1, &pr->c[1]), 0);
    CHECK_EQ(circuit_side(pr->c[0]), 0);
    CHECK_EQ(circuit_side(pr->c[1]), 1);
}

static inline void pair_close(struct pair *pr)
{
    circuit_free(pr->c[0]);
    circuit_free(pr->c[1]);
    if (pr->link1 >= 0)
        close(pr->link1);
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

/* The count an eventfd holds, read (and so reset); 0 if it was not rung. */
static inline uint64_t bell_take(int fd)
{
    uint64_t n = 0;
    if (read(fd, &n, sizeof(n)) < 0) {
        CHECK(errno == EAGAIN);
        return 0;
    }
    return n;
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
