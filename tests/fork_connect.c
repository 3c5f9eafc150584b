/*
 * fork_connect.c - a connect another thread starts while fork() waits for a
 * connect in flight.  Built and run by tests/test_proxystack_preload.py under
 * `circuits run`:
 *
 *     fork_connect HOST HELD_PORT ECHO_PORT
 *
 * The main thread starts a non-blocking connect to HOST:HELD_PORT (the test
 * holds its handshake back) and forks: fork waits for that answer.  Meanwhile
 * a second thread connects to HOST:ECHO_PORT (answered at once).  The child
 * closes its copy of that socket and exits; the parent must still have its
 * connection: a line it writes comes back.  Prints "waiting" when the fork
 * is under way, "ok" at the end, or "FAIL what: why" and exits 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static struct sockaddr_in echo_addr;
static int echo_fd = -1;

static void fail(const char *what, const char *why)
{
    printf("FAIL %s: %s\n", what, why);
    exit(1);
}

static struct sockaddr_in addr_of(const char *host, const char *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
        fail("address", host);
    return a;
}

/* Connect once fork is under way (it waits for the held connect). */
static void *connect_later(void *arg)
{
    (void)arg;
    usleep(300000);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&echo_addr, sizeof(echo_addr)) < 0)
        fail("connect to the echo server", strerror(errno));
    echo_fd = fd;
    return NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 4) {
        fprintf(stderr, "usage: fork_connect HOST HELD_PORT ECHO_PORT\n");
        return 2;
    }
    struct sockaddr_in held = addr_of(argv[1], argv[2]);
    echo_addr = addr_of(argv[1], argv[3]);
    int slow = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (slow < 0 || (connect(slow, (struct sockaddr *)&held, sizeof(held)) < 0 &&
                     errno != EINPROGRESS))
        fail("non-blocking connect", strerror(errno));
    pthread_t t;
    if (pthread_create(&t, NULL, connect_later, NULL))
        fail("pthread_create", "");
    printf("waiting\n"); /* the test releases the held handshake after a while */
    pid_t pid = fork();
    if (pid < 0)
        fail("fork", strerror(errno));
    if (pid == 0) {
        if (echo_fd >= 0)
            close(echo_fd); /* the parent's copy goes on */
        exit(0);            /* the library's destructor counts this process out */
    }
    pthread_join(t, NULL);
    int status;
    if (waitpid(pid, &status, 0) != pid || status != 0)
        fail("child", "did not exit 0");
    struct timeval tv = {.tv_sec = 5};
    setsockopt(echo_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    const char line[] = "parent\n";
    if (write(echo_fd, line, sizeof(line) - 1) != (ssize_t)sizeof(line) - 1)
        fail("write after the child closed its copy", strerror(errno));
    char buf[64] = {0};
    size_t got = 0;
    while (got < sizeof(line) - 1) {
        ssize_t n = read(echo_fd, buf + got, sizeof(buf) - 1 - got);
        if (n <= 0)
            fail("read the echo", n == 0 ? "end of data: the child's close ended it" : strerror(errno));
        got += (size_t)n;
    }
    if (strcmp(buf, line))
        fail("echo", buf);
    printf("ok\n");
    return 0;
}
