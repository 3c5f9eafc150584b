/*
 * bench_setup.c - what the kernel's part of one setup costs, with no Python
 * and no waiting: everything in one thread, so no process ever sleeps or
 * wakes another.  `make -C tests/c bench` runs it (-O2, no sanitizers).
 *
 * circuit: the system calls of a circuit's life as the operator and two
 * guests make them (circuits bench setup measures the real thing):
 *   CONNECT and ACCEPT sent and received (SOCK_SEQPACKET, 64 bytes);
 *   circuit_make: a sealed memfd with its header, two doorbell pairs;
 *   two ringing ends watched for hang-up (epoll), as the operator's table;
 *   each side's four descriptors sent with SCM_RIGHTS and received;
 *   both sides attach (mirror mapping), 1 byte each way, close;
 *   the operator sees both hang-ups, reads the byte counts, closes.
 * tcp: socket, connect and accept over 127.0.0.1, 1 byte each way, close.
 *
 * The difference is what no control path, in Python or in C, can save:
 * kernel objects made and destroyed and memory mapped per setup.  It prints
 * where a circuit's time goes, step by step, and what a wake-up costs (a
 * ping-pong between two processes, CPU time per side): a setup through the
 * operator wakes a process five or six times, a TCP setup three.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "circuit.h"

#define SETUPS 2000
#define ROUNDS 7

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

/* Where a circuit's setup spends its time: lap(i) ends step i. */
static const char *const STEPS[] = {
    "CONNECT and ACCEPT messages", "circuit_make (memfd, header, 2 doorbells)",
    "operator watches 2 ringing ends", "each side's 4 fds sent and received",
    "both sides attach (mirror mapping)", "1 byte each way (first touches)",
    "both sides close and unmap", "operator: hang-ups, byte counts, close",
};
#define NSTEPS (sizeof(STEPS) / sizeof(STEPS[0]))
static double step_us[NSTEPS], lap_at;

static void lap(unsigned i)
{
    double t = now_us();
    step_us[i] += t - lap_at;
    lap_at = t;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void send_fds(int sock, const int *fds, int n)
{
    char msg[64] = {0}, ctl[CMSG_SPACE(4 * sizeof(int))];
    struct iovec iov = {msg, sizeof(msg)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                        .msg_controllen = CMSG_SPACE((size_t)n * sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN((size_t)n * sizeof(int));
    memcpy(CMSG_DATA(c), fds, (size_t)n * sizeof(int));
    if (sendmsg(sock, &mh, 0) < 0)
        die("sendmsg");
}

static void recv_fds(int sock, int *fds, int n)
{
    char msg[64], ctl[CMSG_SPACE(4 * sizeof(int))];
    struct iovec iov = {msg, sizeof(msg)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                        .msg_controllen = sizeof(ctl)};
    if (recvmsg(sock, &mh, MSG_CMSG_CLOEXEC) < 0)
        die("recvmsg");
    memcpy(fds, CMSG_DATA(CMSG_FIRSTHDR(&mh)), (size_t)n * sizeof(int));
}

static void message(int from, int to)
{
    char msg[64] = {0};
    if (send(from, msg, sizeof(msg), 0) < 0 || recv(to, msg, sizeof(msg), 0) < 0)
        die("control message");
}

/* One side's life: attach, 1 byte out and 1 in (or in, then out), close. */
static struct circuit *attach(const int fds[4], const struct circuit_params *p, int side)
{
    struct circuit_fds f = {fds[1], fds[2], fds[3]};
    struct circuit *c;
    if (circuit_attach(fds[0], &f, p, side, &c))
        die("circuit_attach");
    close(fds[0]); /* mapped: the memfd is no longer needed */
    return c;
}

static void circuit_setup(int client[2], int server[2], int watch)
{
    struct circuit_params p = {.kind = CIRCUIT_STREAM, .size = {65536, 65536}};
    lap_at = now_us();
    message(server[1], server[0]); /* ACCEPT */
    message(client[1], client[0]); /* CONNECT */
    lap(0);
    struct circuit_made m;
    if (circuit_make(&p, &m))
        die("circuit_make");
    lap(1);
    for (int s = 0; s < 2; s++) {
        struct epoll_event ev = {.events = 0, .data.fd = m.ring[s]};
        if (epoll_ctl(watch, EPOLL_CTL_ADD, m.ring[s], &ev))
            die("epoll_ctl");
    }
    lap(2);
    int sides[2][4];
    for (int s = 0; s < 2; s++) {
        int fds[4] = {m.memfd, m.bell[s], m.ring[s], m.ring[1 - s]};
        send_fds(s ? server[0] : client[0], fds, 4);
        close(m.bell[s]);
        recv_fds(s ? server[1] : client[1], sides[s], 4);
    }
    lap(3);
    struct circuit *a = attach(sides[0], &p, 0), *b = attach(sides[1], &p, 1);
    lap(4);
    char byte = 'x';
    if (circuit_send(a, &byte, 1, 0, CIRCUIT_FOREVER) != 1 ||
        circuit_recv(b, &byte, 1, 0, CIRCUIT_FOREVER) != 1 ||
        circuit_send(b, &byte, 1, 0, CIRCUIT_FOREVER) != 1 ||
        circuit_recv(a, &byte, 1, 0, CIRCUIT_FOREVER) != 1)
        die("exchange");
    lap(5);
    circuit_free(a); /* closes: unmaps, closes its descriptors */
    circuit_free(b);
    lap(6);
    struct epoll_event evs[2];
    if (epoll_wait(watch, evs, 2, 0) != 2)
        die("hang-ups");
    uint64_t counts[4];
    if (pread(m.memfd, counts, sizeof(counts), CIRCUIT_CTRL_OFFSET) < 0)
        die("pread");
    for (int s = 0; s < 2; s++) {
        epoll_ctl(watch, EPOLL_CTL_DEL, m.ring[s], NULL);
        close(m.ring[s]);
    }
    close(m.memfd);
    lap(7);
}

static void tcp_setup(int listener, const struct sockaddr_in *addr)
{
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c < 0 || connect(c, (const struct sockaddr *)addr, sizeof(*addr)))
        die("connect");
    int s = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    char byte = 'x';
    if (s < 0 || write(c, &byte, 1) != 1 || read(s, &byte, 1) != 1 || write(s, &byte, 1) != 1 ||
        read(c, &byte, 1) != 1)
        die("tcp exchange");
    close(c);
    close(s);
}

static double cpu_us(void)
{
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)(u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e6 +
           (double)(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

/* CPU time per side of a 1-byte ping-pong between two processes: a send
 * that wakes the other, a receive that sleeps until woken. */
static double wakeup_us(void)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv))
        die("socketpair");
    char byte = 'x';
    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < SETUPS * 5; i++)
            if (recv(sv[1], &byte, 1, 0) != 1 || send(sv[1], &byte, 1, 0) != 1)
                _exit(1);
        _exit(0);
    }
    double t0 = cpu_us();
    for (int i = 0; i < SETUPS * 5; i++)
        if (send(sv[0], &byte, 1, 0) != 1 || recv(sv[0], &byte, 1, 0) != 1)
            die("ping-pong");
    double per = (cpu_us() - t0) / (SETUPS * 5);
    waitpid(pid, NULL, 0);
    close(sv[0]);
    close(sv[1]);
    return per;
}

static int cmp(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

int main(void)
{
    int client[2], server[2], watch = epoll_create1(EPOLL_CLOEXEC);
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, client) ||
        socketpair(AF_UNIX, SOCK_SEQPACKET, 0, server) || watch < 0)
        die("control sockets");
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) ||
        listen(listener, 128) || getsockname(listener, (struct sockaddr *)&addr, &len))
        die("listener");
    double circ[ROUNDS], tcp[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) { /* interleaved: the machine's phases hit both */
        double t0 = now_us();
        for (int i = 0; i < SETUPS; i++)
            circuit_setup(client, server, watch);
        double t1 = now_us();
        for (int i = 0; i < SETUPS; i++)
            tcp_setup(listener, &addr);
        circ[r] = (t1 - t0) / SETUPS;
        tcp[r] = (now_us() - t1) / SETUPS;
    }
    qsort(circ, ROUNDS, sizeof(double), cmp);
    qsort(tcp, ROUNDS, sizeof(double), cmp);
    printf("kernel work per setup, one thread, no waits (median of %d x %d):\n", ROUNDS, SETUPS);
    printf("  circuit %6.1f us\n  tcp     %6.1f us\n  ratio   %6.2f\n", circ[ROUNDS / 2],
           tcp[ROUNDS / 2], circ[ROUNDS / 2] / tcp[ROUNDS / 2]);
    printf("a circuit's steps (means over all rounds):\n");
    for (unsigned i = 0; i < NSTEPS; i++)
        printf("  %-44s %6.1f us\n", STEPS[i], step_us[i] / (ROUNDS * SETUPS));
    printf("a wake-up: CPU time per side of a ping-pong between two processes: %.1f us\n",
           wakeup_us());
    return 0;
}
