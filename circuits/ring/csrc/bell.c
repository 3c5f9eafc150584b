/*
 * bell.c - doorbells: how a side wakes its peer, and itself.
 *
 * A doorbell is a connected AF_UNIX stream socket pair.  Side s sleeps on
 * end X_s ("bell") and holds end Y_s ("self_bell") to ring itself; the peer
 * holds a duplicate of Y_s ("peer_bell" on its side) to ring s.  Ringing
 * sends one byte, draining reads them all; both use MSG_DONTWAIT, a
 * per-call flag, so a hostile peer that clears O_NONBLOCK on the socket it
 * shares with us cannot make either block (an eventfd could not be
 * defended: its blocking mode lives in the shared file description).
 *
 * Only side s holds X_s, so when s is gone (closed, exited, killed) the
 * peer's peer_bell reports hang-up: that is how a survivor learns that its
 * peer died without a word.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#include "internal.h"

void circuit_ring(struct circuit *c, int bell)
{
    static const char ding = 1;
    if (bell < 0)
        return;
    /* EAGAIN: unread rings are queued already, one is as good as many. */
    if (send(bell, &ding, 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && bell == c->peer_bell &&
        (errno == EPIPE || errno == ECONNRESET))
        c->peer_gone = true;
}

void circuit_drain_bell(struct circuit *c)
{
    char buf[256];
    /* Bounded: a peer flooding our doorbell cannot keep us here. */
    for (int i = 0; i < 8; i++) {
        ssize_t n = recv(c->bell, buf, sizeof(buf), MSG_DONTWAIT);
        if (n == 0)
            c->peer_gone = true; /* the peer shut our doorbell: it left */
        if (n < (ssize_t)sizeof(buf))
            return;
    }
}

void circuit_check_peer(struct circuit *c)
{
    /* Also our bell's read hang-up: a peer that shut down its end of our
     * doorbell leaves the bell readable for ever (end of file); unless we
     * say it is gone here too, circuit_poll() would report nothing, and a
     * poller deciding by it would spin on that bell. */
    struct pollfd p[2] = {{.fd = c->peer_bell, .events = 0},
                          {.fd = c->bell, .events = POLLRDHUP}};
    if (poll(p, 2, 0) > 0 && ((p[0].revents & (POLLHUP | POLLERR)) ||
                              (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR))))
        c->peer_gone = true;
}

/*
 * After draining our doorbell, ring it again if a poller of it has work:
 * data or an end to receive, or the room that a refused sender waits for.
 * This keeps the rule that fileno() polling relies on: while there is
 * work, our doorbell is readable.
 */
static bool room_for(struct circuit *c, uint64_t need)
{
    uint64_t free;
    return need && (!circuit_tx_peek_free(c, &free) || free >= need || circuit_tx_end(c));
}

/* Returns whether it rang. */
bool circuit_restore_bell(struct circuit *c)
{
    int mask = circuit_readiness(c);
    /* tx_wait: a sender asleep on the bell's next ring (wait.c) is owed it too. */
    bool room = room_for(c, c->tx_need) ||
                room_for(c, __atomic_load_n(&c->tx_wait, __ATOMIC_ACQUIRE));
    if ((mask & CIRCUIT_READABLE) || room) {
        circuit_ring(c, c->self_bell);
        return true;
    }
    return false;
}
