/*
 * udp_resolver.c - the UDP calls of glibc's resolver and getaddrinfo, made
 * through the PLT so that the preload library sees them (glibc's own copies
 * call libc-internal functions that no preload can interpose; see
 * circuits/dnsrelay.py).  Built and run by tests/test_preload_udp.py:
 *
 *     udp_resolver HOST PORT OTHER_PORT
 *
 * 1. getaddrinfo's RFC 3484 sort (sysdeps/posix/getaddrinfo.c): one socket,
 *    for each candidate connect(AF_UNSPEC) then connect() and getsockname().
 * 2. res_send.c send_dg: socket(SOCK_NONBLOCK | SOCK_CLOEXEC), connect(),
 *    sendmmsg() of two queries, then poll() and recvfrom() until both
 *    answers came, each checked to be from the server.
 * Prints "ok" and exits 0, or names the first thing that went wrong.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(cond, what)                                                    \
    do {                                                                     \
        if (!(cond)) {                                                       \
            printf("FAIL %s: %s\n", what, strerror(errno));                  \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

static struct sockaddr_in addr_of(const char *host, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    return a;
}

static void rfc3484_probe(const char *host, int port, int other)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, IPPROTO_IP);
    CHECK(fd >= 0, "socket");
    int ports[2] = {other, port};
    for (int i = 0; i < 2; i++) {
        struct sockaddr unspec = {.sa_family = AF_UNSPEC};
        CHECK(connect(fd, &unspec, sizeof(unspec)) == 0, "connect AF_UNSPEC");
        struct sockaddr_in a = addr_of(host, ports[i]), src;
        socklen_t len = sizeof(src);
        CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "probe connect");
        CHECK(getsockname(fd, (struct sockaddr *)&src, &len) == 0, "getsockname");
        CHECK(len == sizeof(src) && src.sin_family == AF_INET && src.sin_port, "source address");
        struct sockaddr_in peer;
        len = sizeof(peer);
        CHECK(getpeername(fd, (struct sockaddr *)&peer, &len) == 0 &&
                  peer.sin_port == htons((uint16_t)ports[i]), "getpeername after re-connect");
    }
    close(fd);
}

static void send_dg(const char *host, int port)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0, "socket");
    struct sockaddr_in ns = addr_of(host, port);
    CHECK(connect(fd, (struct sockaddr *)&ns, sizeof(ns)) == 0, "connect");
    char q1[] = "\x12\x34query-A", q2[] = "\x56\x78query-AAAA";
    struct iovec iov[2] = {{q1, sizeof(q1) - 1}, {q2, sizeof(q2) - 1}};
    struct mmsghdr m[2] = {{.msg_hdr = {.msg_iov = &iov[0], .msg_iovlen = 1}},
                           {.msg_hdr = {.msg_iov = &iov[1], .msg_iovlen = 1}}};
    CHECK(sendmmsg(fd, m, 2, MSG_NOSIGNAL) == 2, "sendmmsg");
    CHECK(m[0].msg_len == sizeof(q1) - 1 && m[1].msg_len == sizeof(q2) - 1, "sendmmsg lengths");
    int got = 0;
    while (got < 2) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        CHECK(poll(&p, 1, 10000) == 1 && (p.revents & POLLIN), "poll");
        char ans[65536];
        struct sockaddr_in6 from; /* send_dg's buffer is a sockaddr_in6 */
        socklen_t len = sizeof(from);
        ssize_t n = recvfrom(fd, ans, sizeof(ans), 0, (struct sockaddr *)&from, &len);
        CHECK(n > 2, "recvfrom");
        struct sockaddr_in *f = (struct sockaddr_in *)&from;
        CHECK(len == sizeof(struct sockaddr_in) && f->sin_family == AF_INET &&
                  f->sin_port == ns.sin_port && f->sin_addr.s_addr == ns.sin_addr.s_addr,
              "answer from the server");
        const char *want = got == 0 ? q1 : q2;
        CHECK(memcmp(ans, want, strlen(want + 2) + 2) == 0, "answer to the query, in order");
        got++;
    }
    char more[16];
    CHECK(recv(fd, more, sizeof(more), 0) < 0 && errno == EAGAIN, "EAGAIN when drained");
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: udp_resolver HOST PORT OTHER_PORT\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    rfc3484_probe(argv[1], atoi(argv[2]), atoi(argv[3]));
    send_dg(argv[1], atoi(argv[2]));
    printf("ok\n");
    return 0;
}
