/*
 * endpoints.c - everything the two sides of a new circuit need, in one call.
 *
 * The creator (the operator) makes the memory object and both doorbells,
 * and gives each side four descriptors: [memfd, bell, self_bell, peer_bell]
 * (see bell.c for who holds which end, and why).  Every descriptor is new
 * and close-on-exec, so each side's four can be sent and closed on their own.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

static void close_all(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

int circuit_create_endpoints(const struct circuit_params *p, int side0[4], int side1[4])
{
    /* made: memfd, X0, Y0, X1, Y1, then the duplicates memfd', Y0', Y1' */
    int made[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    int err = 0;
    made[0] = circuit_create(p);
    if (made[0] < 0)
        return made[0];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, &made[1]) < 0 ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, &made[3]) < 0 ||
        (made[5] = fcntl(made[0], F_DUPFD_CLOEXEC, 0)) < 0 ||
        (made[6] = fcntl(made[2], F_DUPFD_CLOEXEC, 0)) < 0 ||
        (made[7] = fcntl(made[4], F_DUPFD_CLOEXEC, 0)) < 0)
        err = -errno;
    if (err) {
        close_all(made, 8);
        return err;
    }
    /* side 0 sleeps on X0, rings itself with Y0, rings side 1 with Y1' */
    side0[0] = made[0], side0[1] = made[1], side0[2] = made[2], side0[3] = made[7];
    side1[0] = made[5], side1[1] = made[3], side1[2] = made[4], side1[3] = made[6];
    return 0;
}

int circuit_ring_end_alive(int fd)
{
    char buf[256];
    /* MSG_DONTWAIT: the guest shares this description and may have made it
     * blocking.  Bytes a guest wrote into its own bell are drained, never
     * taken for its death; only end of file (or an error) is. */
    for (int i = 0; i < 8; i++) {
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n == 0)
            return 0;
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 1 : 0;
    }
    return 1;
}
