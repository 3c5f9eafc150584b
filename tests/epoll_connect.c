/*
 * epoll_connect.c - sockets put in an epoll set before they connect or
 * listen, as event loops do.  Built and run by tests/test_preload_epoll.py
 * under `circuits run`:
 *
 *     epoll_connect nginx HOST PORT     nginx's upstream connect
 *         (ngx_event_connect_peer): socket, FIONBIO, epoll_ctl ADD
 *         EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET, connect (EINPROGRESS), wait
 *         for EPOLLOUT, SO_ERROR, then write a line and wait (edge-triggered)
 *         for its echo; twice, the second on a socket that a dup holds
 *         while the number it connected on is closed
 *     epoll_connect refused HOST PORT   the same sequence to nobody: the
 *         errno SO_ERROR gives after EPOLLOUT|EPOLLERR
 *     epoll_connect listen HOST PORT    epoll_ctl ADD, then bind and listen:
 *         wait for EPOLLIN, accept one connection, echo a line
 *     epoll_connect udp HOST PORT1 PORT2  a UDP socket in an epoll set
 *         connected, then re-connected elsewhere: each echo wakes the set;
 *         then a dup of it in the set, re-connected through the other number
 *     epoll_connect again HOST PORT     a non-blocking connect, then connect()
 *         again every 10 ms, with no poll between, until it says 0 or
 *         EISCONN (the kernel's: EALREADY while in flight, then 0 once);
 *         to nobody, it says ECONNREFUSED once, then tries anew
 *     epoll_connect thread HOST PORT    a thread asleep in epoll_wait on a
 *         set of a pipe while another adds a fresh socket to the set and
 *         connects it: the sleeper sees the socket's EPOLLOUT within 1 s,
 *         and no event of any other data
 *     epoll_connect add HOST PORT       a thread asleep in epoll_wait while
 *         another adds a fresh socket to its set, first to a set of a pipe
 *         only, then to one that holds a circuit socket already: the sleeper
 *         wakes with its EPOLLOUT (the kernel reports it at the ADD)
 *     epoll_connect mod HOST PORT       a thread asleep in epoll_wait on a
 *         connected socket registered for EPOLLIN while another thread
 *         MODs it to EPOLLIN|EPOLLOUT: the sleeper wakes with EPOLLOUT
 *     epoll_connect oneshot HOST PORT   a thread asleep in epoll_wait on a set
 *         whose EPOLLONESHOT registration it reported already, while another
 *         reads to EAGAIN and MODs the registration on again: the next echo
 *         wakes the sleeper (three times)
 *     epoll_connect fork HOST PORT      a thread loops in epoll_wait on a set
 *         holding a connected socket while another forks 50 times; each
 *         child closes the socket and exits: within 2 s, or it inherited a
 *         lock the looping thread held
 *
 * Prints "ok ..." and exits 0, or "FAIL what: why" and exits 1.  Every wait
 * is bounded (5 s): a wake-up that never comes is a failure, not a hang.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WAIT_MS 5000

static void fail(const char *what, const char *why)
{
    printf("FAIL %s: %s\n", what, why);
    exit(1);
}

#define CHECK(cond, what)                \
    do {                                 \
        if (!(cond))                     \
            fail(what, strerror(errno)); \
    } while (0)

static struct sockaddr_in addr_of(const char *host, const char *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
        fail("address", host);
    return a;
}

/* Wait for an event of data `tag` with any of `want`; its events. */
static uint32_t wait_for(int ep, uint64_t tag, uint32_t want, const char *what)
{
    struct epoll_event ev[8];
    for (;;) {
        int n = epoll_wait(ep, ev, 8, WAIT_MS);
        CHECK(n >= 0, what);
        if (n == 0)
            fail(what, "no event within 5 s");
        for (int i = 0; i < n; i++)
            if (ev[i].data.u64 == tag && (ev[i].events & want))
                return ev[i].events;
    }
}

/* Read until a newline comes, waiting for EPOLLIN edges between reads. */
static size_t read_line(int ep, int fd, uint64_t tag, char *buf, size_t size)
{
    size_t got = 0;
    while (!memchr(buf, '\n', got)) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0)
            fail("read", "end of data before the line");
        CHECK(errno == EAGAIN, "read");
        wait_for(ep, tag, EPOLLIN, "EPOLLIN for the echo");
    }
    return got;
}

/* ngx_event_connect_peer: registered before connect; 0 or SO_ERROR's errno. */
static int nginx_connect(int ep, const struct sockaddr_in *a, uint64_t tag, int *out)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0), on = 1;
    CHECK(fd >= 0, "socket");
    CHECK(ioctl(fd, FIONBIO, &on) == 0, "FIONBIO");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u64 = tag};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD before connect");
    int rc = connect(fd, (const struct sockaddr *)a, sizeof(*a));
    CHECK(rc == 0 || errno == EINPROGRESS, "connect");
    wait_for(ep, tag, EPOLLOUT, "EPOLLOUT after connect");
    int err = -1;
    socklen_t len = sizeof(err);
    CHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0, "SO_ERROR");
    *out = fd;
    return err;
}

static void echo_once(int ep, int fd, uint64_t tag, const char *line)
{
    char buf[256] = {0};
    CHECK(write(fd, line, strlen(line)) == (ssize_t)strlen(line), "write");
    size_t n = read_line(ep, fd, tag, buf, sizeof(buf) - 1);
    if (n != strlen(line) || memcmp(buf, line, n))
        fail("echo", buf);
}

static int role_nginx(const struct sockaddr_in *a)
{
    int ep = epoll_create1(EPOLL_CLOEXEC), fd;
    CHECK(ep >= 0, "epoll_create1");
    int err = nginx_connect(ep, a, 1, &fd);
    if (err)
        fail("SO_ERROR", strerror(err));
    echo_once(ep, fd, 1, "upstream one\n");
    /* Keep a dup, close the number connect() is called on before it settles. */
    int fd2, keep;
    err = nginx_connect(ep, a, 2, &fd2);
    if (err)
        fail("SO_ERROR (second)", strerror(err));
    CHECK((keep = dup(fd2)) >= 0, "dup");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.u64 = 3};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, keep, &ev) == 0, "epoll_ctl ADD of the dup");
    close(fd2);
    echo_once(ep, keep, 3, "upstream two\n");
    close(keep);
    close(fd);
    printf("ok nginx\n");
    return 0;
}

static int role_refused(const struct sockaddr_in *a)
{
    int ep = epoll_create1(EPOLL_CLOEXEC), fd;
    CHECK(ep >= 0, "epoll_create1");
    int err = nginx_connect(ep, a, 1, &fd);
    printf("ok %s\n", err == ECONNREFUSED ? "ECONNREFUSED" : err == EACCES ? "EACCES"
                      : strerror(err));
    return 0;
}

static int role_listen(const struct sockaddr_in *a)
{
    int ep = epoll_create1(EPOLL_CLOEXEC), on = 1;
    int lst = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(ep >= 0 && lst >= 0, "socket");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.u64 = 7};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, lst, &ev) == 0, "epoll_ctl ADD before listen");
    CHECK(setsockopt(lst, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) == 0, "SO_REUSEADDR");
    CHECK(bind(lst, (const struct sockaddr *)a, sizeof(*a)) == 0, "bind");
    CHECK(listen(lst, 16) == 0, "listen");
    printf("listening\n");
    fflush(stdout);
    wait_for(ep, 7, EPOLLIN, "EPOLLIN of the listener");
    int conn = accept4(lst, NULL, NULL, SOCK_NONBLOCK);
    CHECK(conn >= 0, "accept4");
    ev = (struct epoll_event){.events = EPOLLIN | EPOLLET, .data.u64 = 8};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, conn, &ev) == 0, "epoll_ctl ADD of the connection");
    char buf[256] = {0};
    size_t n = read_line(ep, conn, 8, buf, sizeof(buf) - 1);
    CHECK(write(conn, buf, n) == (ssize_t)n, "write");
    close(conn);
    printf("ok listen\n");
    return 0;
}

/* One datagram out, its echo back through the epoll set (registered as tag). */
static void udp_round(int ep, int fd, uint64_t tag, const char *msg)
{
    char buf[512];
    CHECK(send(fd, msg, strlen(msg), 0) == (ssize_t)strlen(msg), "send");
    wait_for(ep, tag, EPOLLIN, "EPOLLIN of the UDP socket");
    ssize_t n = recv(fd, buf, sizeof(buf) - 1, MSG_DONTWAIT);
    CHECK(n > 0, "recv");
    buf[n] = 0;
    if (strncmp(buf, msg, strlen(msg)))
        fail("udp echo", buf);
}

static int role_udp(const char *host, const char *port1, const char *port2)
{
    struct sockaddr_in a = addr_of(host, port1), b = addr_of(host, port2);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    CHECK(ep >= 0 && fd >= 0, "socket");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 9};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD before connect");
    CHECK(connect(fd, (const struct sockaddr *)&a, sizeof(a)) == 0, "connect");
    udp_round(ep, fd, 9, "first");
    CHECK(connect(fd, (const struct sockaddr *)&b, sizeof(b)) == 0, "re-connect");
    udp_round(ep, fd, 9, "second");
    int d = dup(fd);
    CHECK(d >= 0, "dup");
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL) == 0, "epoll_ctl DEL");
    ev.data.u64 = 10;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, d, &ev) == 0, "epoll_ctl ADD of the dup");
    CHECK(connect(fd, (const struct sockaddr *)&a, sizeof(a)) == 0, "re-connect (other number)");
    udp_round(ep, d, 10, "third");
    printf("ok udp\n");
    return 0;
}

static int role_again(const struct sockaddr_in *a)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(fd >= 0, "socket");
    int rc = connect(fd, (const struct sockaddr *)a, sizeof(*a));
    CHECK(rc == 0 || errno == EINPROGRESS, "connect");
    int tries = 0;
    for (; rc != 0 && tries < WAIT_MS / 10; tries++) {
        usleep(10000);
        rc = connect(fd, (const struct sockaddr *)a, sizeof(*a));
        if (rc < 0 && errno == EISCONN)
            fail("connect again", "EISCONN before any 0 (the kernel's says 0 once)");
        if (rc < 0 && errno == ECONNREFUSED) { /* reported once, then a new try */
            rc = connect(fd, (const struct sockaddr *)a, sizeof(*a));
            CHECK(rc < 0 && errno == EINPROGRESS, "connect after the refusal");
            printf("ok again ECONNREFUSED\n");
            return 0;
        }
        if (rc < 0 && errno != EALREADY && errno != EINPROGRESS)
            fail("connect again", strerror(errno));
    }
    if (rc != 0)
        fail("connect again", "still EALREADY after 5 s");
    rc = connect(fd, (const struct sockaddr *)a, sizeof(*a));
    if (rc == 0 || errno != EISCONN)
        fail("connect once more", rc == 0 ? "0, not EISCONN" : strerror(errno));
    int off = 0;
    CHECK(ioctl(fd, FIONBIO, &off) == 0, "FIONBIO");
    char buf[64] = {0};
    CHECK(write(fd, "again\n", 6) == 6, "write");
    size_t got = 0;
    while (!memchr(buf, '\n', got)) {
        ssize_t n = read(fd, buf + got, sizeof(buf) - 1 - got);
        CHECK(n > 0, "read");
        got += (size_t)n;
    }
    if (strcmp(buf, "again\n"))
        fail("echo", buf);
    close(fd);
    printf("ok again\n");
    return 0;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A thread in epoll_wait on ep until it sees `tag` with any of `want`. */
struct sleeper {
    int ep;
    uint64_t tag;
    uint32_t want;
    pthread_t thread;
    int64_t woke_ms;   /* when it saw it; -1: never */
    char bad[128];     /* what else it saw, if anything */
};

static void *sleep_on(void *arg)
{
    struct sleeper *z = arg;
    int64_t end = now_ms() + WAIT_MS;
    while (now_ms() < end) {
        struct epoll_event ev[8];
        int n = epoll_wait(z->ep, ev, 8, (int)(end - now_ms()));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            snprintf(z->bad, sizeof(z->bad), "epoll_wait: %s", strerror(errno));
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u64 != z->tag) {
                snprintf(z->bad, sizeof(z->bad), "an event of data %#llx (events %#x)",
                         (unsigned long long)ev[i].data.u64, ev[i].events);
                return NULL;
            }
            if (ev[i].events & z->want) {
                z->woke_ms = now_ms();
                return NULL;
            }
        }
    }
    return NULL;
}

/* Start a sleeper on ep for tag's `want`; it is asleep in the kernel on return. */
static void fall_asleep(struct sleeper *z, int ep, uint64_t tag, uint32_t want)
{
    *z = (struct sleeper){.ep = ep, .tag = tag, .want = want, .woke_ms = -1};
    CHECK(pthread_create(&z->thread, NULL, sleep_on, z) == 0, "pthread_create");
    usleep(200000);
}

/* The sleeper saw its event within 1 s of `since`, and nothing else. */
static void woke(struct sleeper *z, int64_t since, const char *after)
{
    char why[64];
    pthread_join(z->thread, NULL);
    if (z->bad[0])
        fail("the sleeper", z->bad);
    snprintf(why, sizeof(why), "no %s within 1 s of the %s",
             z->want == EPOLLIN ? "EPOLLIN" : "EPOLLOUT", after);
    if (z->woke_ms < 0 || z->woke_ms - since > 1000)
        fail("the sleeper", why);
}

/* A set of a pipe: no circuit socket in it. */
static int pipe_set(void)
{
    int ep = epoll_create1(EPOLL_CLOEXEC), p[2];
    CHECK(ep >= 0 && pipe(p) == 0, "epoll_create1, pipe");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 100};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev) == 0, "epoll_ctl ADD of the pipe");
    return ep;
}

/* A fresh non-blocking socket added to ep under tag; its number. */
static int add_fresh(int ep, uint64_t tag, uint32_t events)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(fd >= 0, "socket");
    struct epoll_event ev = {.events = events, .data.u64 = tag};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD");
    return fd;
}

static int role_thread(const struct sockaddr_in *a)
{
    int ep = pipe_set();
    struct sleeper z;
    fall_asleep(&z, ep, 1, EPOLLOUT);
    int64_t added = now_ms();
    int fd = add_fresh(ep, 1, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET);
    int rc = connect(fd, (const struct sockaddr *)a, sizeof(*a));
    CHECK(rc == 0 || errno == EINPROGRESS, "connect");
    woke(&z, added, "ADD and connect");
    close(fd);
    printf("ok thread\n");
    return 0;
}

static int role_add(const struct sockaddr_in *a)
{
    (void)a;
    int ep = pipe_set(), fd[2];
    struct sleeper z;
    for (int i = 0; i < 2; i++) { /* first no circuit socket in the set, then one (reported) */
        fall_asleep(&z, ep, (uint64_t)i + 1, EPOLLOUT);
        int64_t added = now_ms();
        fd[i] = add_fresh(ep, (uint64_t)i + 1, EPOLLOUT | EPOLLONESHOT);
        woke(&z, added, "ADD");
    }
    close(fd[0]);
    close(fd[1]);
    printf("ok add\n");
    return 0;
}

/* A socket connected (blocking) to a, in a new set *ep for EPOLLIN under data 1. */
static int connected_in_set(const struct sockaddr_in *a, int *ep)
{
    *ep = epoll_create1(EPOLL_CLOEXEC);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(*ep >= 0 && fd >= 0, "epoll_create1, socket");
    CHECK(connect(fd, (const struct sockaddr *)a, sizeof(*a)) == 0, "connect");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 1};
    CHECK(epoll_ctl(*ep, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD");
    return fd;
}

static int role_mod(const struct sockaddr_in *a)
{
    int ep, fd = connected_in_set(a, &ep);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = 1};
    struct sleeper z;
    fall_asleep(&z, ep, 1, EPOLLOUT);
    int64_t modified = now_ms();
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) == 0, "epoll_ctl MOD");
    woke(&z, modified, "MOD");
    close(fd);
    printf("ok mod\n");
    return 0;
}

/* Read what is there until EAGAIN (fd non-blocking). */
static void drain(int fd)
{
    char buf[256];
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
    CHECK(errno == EAGAIN, "read until EAGAIN");
}

/* A thread pool's EPOLLONESHOT: a thread reports the socket (the registration
 * is off), goes back to sleep; another reads to EAGAIN and MODs it on again;
 * the next data must wake the sleeper, as the kernel's MOD re-arms. */
static int role_oneshot(const struct sockaddr_in *a)
{
    int ep, fd = connected_in_set(a, &ep), on = 1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.u64 = 1};
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) == 0, "epoll_ctl MOD to EPOLLONESHOT");
    CHECK(ioctl(fd, FIONBIO, &on) == 0, "FIONBIO");
    for (int i = 0; i < 3; i++) {
        CHECK(write(fd, "one\n", 4) == 4, "write");
        wait_for(ep, 1, EPOLLIN, "EPOLLIN for the first echo"); /* now off */
        struct sleeper z;
        fall_asleep(&z, ep, 1, EPOLLIN); /* asleep on a set whose one registration is off */
        drain(fd);
        CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) == 0, "epoll_ctl MOD (re-arm)");
        usleep(100000);
        int64_t sent = now_ms();
        CHECK(write(fd, "two\n", 4) == 4, "write");
        woke(&z, sent, "echo that followed the re-arm");
        drain(fd);
        CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) == 0, "epoll_ctl MOD (re-arm)");
    }
    close(fd);
    printf("ok oneshot\n");
    return 0;
}

static volatile int looping = 1;

static void *loop_on(void *arg)
{
    struct epoll_event ev[8];
    while (looping)
        epoll_wait(*(int *)arg, ev, 8, 0);
    return NULL;
}

static int role_fork(const struct sockaddr_in *a)
{
    int ep, fd = connected_in_set(a, &ep);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, loop_on, &ep) == 0, "pthread_create");
    for (int i = 0; i < 50; i++) {
        pid_t child = fork();
        CHECK(child >= 0, "fork");
        if (child == 0) {
            close(fd);
            _exit(0);
        }
        int status = -1;
        for (int k = 0; k < 200 && waitpid(child, &status, WNOHANG) == 0; k++)
            usleep(10000);
        if (status != 0) {
            kill(child, SIGKILL);
            waitpid(child, NULL, 0);
            fail("fork", "a child did not close its socket and exit within 2 s");
        }
    }
    looping = 0;
    pthread_join(t, NULL);
    close(fd);
    printf("ok fork\n");
    return 0;
}

static const struct {
    const char *name;
    int (*run)(const struct sockaddr_in *);
} roles[] = {
    {"nginx", role_nginx}, {"refused", role_refused}, {"listen", role_listen},
    {"again", role_again}, {"thread", role_thread}, {"add", role_add}, {"mod", role_mod},
    {"fork", role_fork}, {"oneshot", role_oneshot},
};

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (size_t i = 0; argc == 4 && i < sizeof(roles) / sizeof(roles[0]); i++) {
        if (!strcmp(argv[1], roles[i].name)) {
            struct sockaddr_in a = addr_of(argv[2], argv[3]);
            return roles[i].run(&a);
        }
    }
    if (argc == 5 && !strcmp(argv[1], "udp"))
        return role_udp(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: epoll_connect nginx|refused|listen|again|thread|add|mod|fork|oneshot HOST PORT"
                    " | udp HOST PORT1 PORT2\n");
    return 2;
}
