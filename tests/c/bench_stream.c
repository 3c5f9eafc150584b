/*
 * bench_stream.c - the C core's own stream ceiling, with no Python in the way:
 * a parent and a forked child, 64 KiB copying sends and receives through a
 * circuit, 4 GiB per ring size.  `make -C tests/c bench` builds it with -O2
 * (not the sanitizers) and runs it.  circuits bench ring shows what the
 * Python endpoint reaches of this.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "circuit.h"

#define CHUNK 65536
#define TOTAL ((size_t)4 << 30)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* One circuit, side 0 in a child writing, side 1 here reading; GB/s. */
static double run(uint64_t ring)
{
    struct circuit_params p = {.kind = CIRCUIT_STREAM, .size = {ring, ring}};
    int memfd = circuit_create(&p), d0[2], d1[2];
    if (memfd < 0 || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, d0) ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, d1))
        return -1;
    struct circuit_fds f0 = {d0[0], d0[1], dup(d1[1])}, f1 = {d1[0], d1[1], dup(d0[1])};
    struct circuit *a, *b;
    if (circuit_attach(memfd, &f0, &p, 0, &a) || circuit_attach(memfd, &f1, &p, 1, &b))
        return -1;
    char *buf = malloc(CHUNK);
    memset(buf, 0xa5, CHUNK);
    pid_t pid = fork();
    if (pid == 0) {
        circuit_detach(b);
        for (size_t sent = 0; sent < TOTAL; sent += CHUNK)
            circuit_send(a, buf, CHUNK, CIRCUIT_ALL, CIRCUIT_FOREVER);
        circuit_close(a);
        _exit(0);
    }
    circuit_detach(a);
    double t0 = now();
    size_t got = 0;
    ssize_t n;
    while ((n = circuit_recv(b, buf, CHUNK, 0, CIRCUIT_FOREVER)) > 0)
        got += (size_t)n;
    double elapsed = now() - t0;
    waitpid(pid, NULL, 0);
    circuit_free(a);
    circuit_free(b);
    close(memfd);
    free(buf);
    return got == TOTAL ? (double)got / elapsed / 1e9 : -1;
}

int main(void)
{
    uint64_t rings[] = {1 << 18, 1 << 20, 4 << 20};
    for (size_t i = 0; i < sizeof(rings) / sizeof(rings[0]); i++)
        printf("C core, 64 KiB copying writes, ring %5llu KiB: %.2f GB/s\n",
               (unsigned long long)(rings[i] >> 10), run(rings[i]));
    return 0;
}
