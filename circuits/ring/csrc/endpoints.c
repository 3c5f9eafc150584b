/*
 * endpoints.c - everything the two sides of a new circuit need, in one call.
 *
 * The creator (the operator) makes the memory object and both doorbells,
 * and gives each side four descriptors: [memfd, bell, self_bell, peer_bell]
 * (see bell.c for who holds which end, and why).
 *
 * circuit_make() makes five descriptors and no more: side s is handed
 * [memfd, bell[s], ring[s], ring[1-s]], the same numbers for the three both
 * sides hold.  A creator that sends the descriptors (SCM_RIGHTS copies them)
 * closes bell[s] once side s has it, and keeps the memfd and both ringing
 * ends for as long as it watches the circuit: no duplicates to make and
 * close.  circuit_create_endpoints() gives each side four descriptors of its
 * own instead (three duplicates more), for callers that hand each list to
 * an owner that closes it.  Every descriptor is close-on-exec.
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

int circuit_make(const struct circuit_params *p, struct circuit_made *m)
{
    int fds[5] = {-1, -1, -1, -1, -1}; /* memfd, X0, Y0, X1, Y1 */
    fds[0] = circuit_create(p);
    if (fds[0] < 0)
        return fds[0];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, &fds[1]) < 0 ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, &fds[3]) < 0) {
        int err = -errno;
        close_all(fds, 5);
        return err;
    }
    m->memfd = fds[0];
    m->bell[0] = fds[1], m->ring[0] = fds[2];
    m->bell[1] = fds[3], m->ring[1] = fds[4];
    return 0;
}

int circuit_create_endpoints(const struct circuit_params *p, int side0[4], int side1[4])
{
    struct circuit_made m;
    int err = circuit_make(p, &m);
    if (err)
        return err;
    /* side 1 gets duplicates of the three descriptors both sides hold */
    int dups[3] = {fcntl(m.memfd, F_DUPFD_CLOEXEC, 0), fcntl(m.ring[1], F_DUPFD_CLOEXEC, 0),
                   fcntl(m.ring[0], F_DUPFD_CLOEXEC, 0)};
    if (dups[0] < 0 || dups[1] < 0 || dups[2] < 0) {
        err = -errno;
        int made[5] = {m.memfd, m.bell[0], m.ring[0], m.bell[1], m.ring[1]};
        close_all(dups, 3);
        close_all(made, 5);
        return err;
    }
    /* side 0 sleeps on X0, rings itself with Y0, rings side 1 with Y1' */
    side0[0] = m.memfd, side0[1] = m.bell[0], side0[2] = m.ring[0], side0[3] = dups[1];
    side1[0] = dups[0], side1[1] = m.bell[1], side1[2] = m.ring[1], side1[3] = dups[2];
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
