/*
 * test_hostile.c - a peer that lies.  The object is mapped once more, as
 * the peer maps it, and the fields the peer may write are forged: indices
 * out of range or going backwards, misaligned datagram indices, bad record
 * headers, a nonsense state.  The victim must answer -ECONNRESET (and go on
 * answering it), abort the circuit, and never crash or touch memory outside
 * its mappings.  Then a long random scribble over the whole object while
 * both endpoints keep calling: every answer must be in bounds or a
 * documented error.
 */
#include "harness.h"

#include <pthread.h>

#define RING 4096u

enum op { OP_RECV, OP_PEEK, OP_SEND, OP_RESERVE, NOPS };
static const char *const op_names[] = {"recv", "peek", "send", "reserve"};

static uint64_t record(uint64_t len) { return 8 + ((len + 7) & ~7ull); }

/* One data-path call, bounded in time whatever happens. */
static ssize_t call(struct circuit *c, enum op op, int nonblock)
{
    static uint8_t buf[2 * RING];
    int flags = nonblock ? CIRCUIT_NONBLOCK : 0;
    int64_t deadline = in_ms(2000);
    void *p = NULL;
    switch (op) {
    case OP_RECV:
        return circuit_recv(c, buf, sizeof(buf), flags, deadline);
    case OP_PEEK:
        return circuit_peek(c, flags, deadline, &p);
    case OP_SEND:
        return circuit_send(c, "x", 1, flags, deadline);
    case OP_RESERVE:
        return circuit_reserve(c, 1, flags, deadline, &p);
    default:
        CHECK(0);
    }
    return 0;
}

/* --- The lies.  Victim is side v; the liar writes side 1 - v's fields. --- */

struct lie_ctx {
    struct pair *pr;
    uint8_t *m;   /* raw mapping of the object */
    int v;        /* victim side */
    struct circuit_dir_ctrl *rx, *tx; /* the victim's directions, raw */
    uint8_t *rx_data;
    uint64_t rx_size, tx_size;
};

enum lie_class { LIE_RX, LIE_TX, LIE_STATE };

struct lie {
    const char *name;
    int kinds; /* 1: stream, 2: dgram, 3: both */
    enum lie_class cls;
    void (*apply)(struct lie_ctx *x);
};

static struct circuit *victim(struct lie_ctx *x) { return x->pr->c[x->v]; }
static struct circuit *honest(struct lie_ctx *x) { return x->pr->c[1 - x->v]; }
static int is_dgram(struct lie_ctx *x) { return x->pr->p.kind == CIRCUIT_DGRAM; }

static void write_record(struct lie_ctx *x, uint32_t len, uint32_t reserved)
{
    uint64_t at = circuit_bytes_received(victim(x));
    struct circuit_record h = {.len = len, .reserved = reserved};
    memcpy(x->rx_data + (at & (x->rx_size - 1)), &h, sizeof(h));
}

/* rx: the producer claims more than the ring holds. */
static void prod_beyond_by_one(struct lie_ctx *x)
{
    x->rx->prod = x->rx_size + (is_dgram(x) ? 8 : 1);
}
static void prod_beyond_huge(struct lie_ctx *x) { x->rx->prod = UINT64_MAX - 7; }
static void prod_beyond_half(struct lie_ctx *x) { x->rx->prod = 1ull << 63; }

/* Honest traffic first, so the victim has seen a prod it can hold the peer to. */
static void honest_then_seen(struct lie_ctx *x)
{
    static uint8_t junk[256];
    if (is_dgram(x)) {
        CHECK_EQ(circuit_send(honest(x), junk, 100, 0, CIRCUIT_FOREVER), 100);
        CHECK_EQ(circuit_send(honest(x), junk, 100, 0, CIRCUIT_FOREVER), 100);
        CHECK_EQ(circuit_recv(victim(x), junk, 256, 0, CIRCUIT_FOREVER), 100);
    } else {
        CHECK_EQ(circuit_send(honest(x), junk, 200, 0, CIRCUIT_FOREVER), 200);
        CHECK_EQ(circuit_recv(victim(x), junk, 50, 0, CIRCUIT_FOREVER), 50);
    }
}

/* rx: the producer takes back data the victim has already been shown. */
static void prod_backwards(struct lie_ctx *x)
{
    honest_then_seen(x);
    x->rx->prod -= 8;
}
static void prod_backwards_below_cons(struct lie_ctx *x)
{
    honest_then_seen(x);
    x->rx->prod = 0;
}

/* rx: datagram indices move in whole 8-byte units. */
static void prod_misaligned(struct lie_ctx *x)
{
    write_record(x, 4, 0);
    x->rx->prod = 12;
}
static void prod_misaligned_later(struct lie_ctx *x)
{
    honest_then_seen(x);
    x->rx->prod += 3;
}

/* rx: record headers that cannot be. */
static void record_len_ring(struct lie_ctx *x)
{
    write_record(x, (uint32_t)x->rx_size, 0);
    x->rx->prod = x->rx_size;
}
static void record_len_max(struct lie_ctx *x)
{
    write_record(x, UINT32_MAX, 0);
    x->rx->prod = 16;
}
static void record_len_unpublished(struct lie_ctx *x)
{
    write_record(x, 100, 0);
    x->rx->prod = 16; /* 100 bytes claimed, 8 published */
}
static void record_len_one_over(struct lie_ctx *x)
{
    /* 104 bytes published: room for a 96-byte payload; 97 claimed. */
    write_record(x, 97, 0);
    x->rx->prod = 104;
}
static void record_reserved(struct lie_ctx *x)
{
    write_record(x, 4, 1);
    x->rx->prod = 16;
}
static void record_reserved_high(struct lie_ctx *x)
{
    write_record(x, 0, 0x80000000u);
    x->rx->prod = 8;
}

/* tx: the consumer claims to have read what was never written. */
static void cons_beyond_prod(struct lie_ctx *x) { x->tx->cons = is_dgram(x) ? 8 : 1; }
static void cons_beyond_huge(struct lie_ctx *x) { x->tx->cons = UINT64_MAX & ~7ull; }

/* tx: the consumer un-reads. */
static void cons_backwards(struct lie_ctx *x)
{
    static uint8_t junk[256];
    CHECK_EQ(circuit_send(victim(x), junk, 96, 0, CIRCUIT_FOREVER), 96);
    CHECK(circuit_recv(honest(x), junk, sizeof(junk), 0, CIRCUIT_FOREVER) == 96);
    /* The victim sees the honest cons on its next send. */
    CHECK_EQ(circuit_send(victim(x), junk, 8, 0, CIRCUIT_FOREVER), 8);
    x->tx->cons -= 8;
}

/* tx: datagram cons moves in whole records. */
static void cons_misaligned(struct lie_ctx *x)
{
    CHECK_EQ(circuit_send(victim(x), "abc", 3, 0, CIRCUIT_FOREVER), 3);
    x->tx->cons = 4;
}

/* state: not a state at all. */
static void state_77(struct lie_ctx *x)
{
    ((struct circuit_header *)x->m)->side[1 - x->v].state = 77;
}
static void state_4(struct lie_ctx *x)
{
    ((struct circuit_header *)x->m)->side[1 - x->v].state = CIRCUIT_ABORTED + 1;
}
static void state_max(struct lie_ctx *x)
{
    ((struct circuit_header *)x->m)->side[1 - x->v].state = UINT32_MAX;
}

static const struct lie lies[] = {
    {"prod_beyond_cons_plus_size", 3, LIE_RX, prod_beyond_by_one},
    {"prod_beyond_huge", 3, LIE_RX, prod_beyond_huge},
    {"prod_beyond_half_range", 3, LIE_RX, prod_beyond_half},
    {"prod_backwards", 3, LIE_RX, prod_backwards},
    {"prod_backwards_below_cons", 3, LIE_RX, prod_backwards_below_cons},
    {"prod_misaligned", 2, LIE_RX, prod_misaligned},
    {"prod_misaligned_later", 2, LIE_RX, prod_misaligned_later},
    {"record_len_ring", 2, LIE_RX, record_len_ring},
    {"record_len_u32_max", 2, LIE_RX, record_len_max},
    {"record_len_unpublished", 2, LIE_RX, record_len_unpublished},
    {"record_len_one_over", 2, LIE_RX, record_len_one_over},
    {"record_reserved_nonzero", 2, LIE_RX, record_reserved},
    {"record_reserved_high_bit", 2, LIE_RX, record_reserved_high},
    {"cons_beyond_prod", 3, LIE_TX, cons_beyond_prod},
    {"cons_beyond_huge", 3, LIE_TX, cons_beyond_huge},
    {"cons_backwards", 3, LIE_TX, cons_backwards},
    {"cons_misaligned", 2, LIE_TX, cons_misaligned},
    {"peer_state_77", 3, LIE_STATE, state_77},
    {"peer_state_4", 3, LIE_STATE, state_4},
    {"peer_state_u32_max", 3, LIE_STATE, state_max},
};

static int detects(enum lie_class cls, enum op op)
{
    if (cls == LIE_STATE)
        return 1;
    return cls == LIE_RX ? (op == OP_RECV || op == OP_PEEK)
                         : (op == OP_SEND || op == OP_RESERVE);
}

static void one_lie(const struct lie *l, uint32_t kind, int v, enum op first, int nonblock)
{
    struct pair pr;
    pair_open(&pr, kind, RING, 2 * RING);
    struct lie_ctx x = {.pr = &pr, .m = raw_map(&pr), .v = v};
    x.rx = raw_dir(x.m, 1 - v);
    x.tx = raw_dir(x.m, v);
    x.rx_data = raw_data(&pr, x.m, 1 - v);
    x.rx_size = pr.p.size[1 - v];
    x.tx_size = pr.p.size[v];
    struct circuit *c = victim(&x);
    l->apply(&x);

    int64_t t0 = now_ns();
    ssize_t rc = call(c, first, nonblock);
    if (rc != -ECONNRESET) {
        fprintf(stderr, "lie %s, kind %u, side %d, %s%s: got %zd\n", l->name, kind, v,
                op_names[first], nonblock ? " nonblock" : "", rc);
        CHECK(!"victim did not reset");
    }
    /* Every call after it is a reset too, at once. */
    for (int round = 0; round < 2; round++)
        for (enum op op = 0; op < NOPS; op++)
            CHECK_EQ(call(c, op, round), -ECONNRESET);
    CHECK(now_ns() - t0 < 1000 * 1000000LL);
    int mask = circuit_poll(c);
    CHECK(mask & CIRCUIT_HANGUP);
    CHECK(mask & CIRCUIT_READABLE);
    /* The victim told the world. */
    CHECK_EQ(raw_hdr(x.m)->side[v].state, CIRCUIT_ABORTED);
    /* The honest peer may still drain what was published, then is reset. */
    ssize_t prc;
    int n = 0;
    do
        prc = call(honest(&x), OP_RECV, 1);
    while (prc >= 0 && ++n < 100);
    CHECK_EQ(prc, -ECONNRESET);
    CHECK_EQ(call(honest(&x), OP_SEND, 0), -ECONNRESET);
    /* And closing after all that is clean. */
    CHECK_EQ(circuit_close(c), 0);
    raw_unmap(&pr, x.m);
    pair_close(&pr);
}

static void test_lies(void)
{
    for (size_t i = 0; i < sizeof(lies) / sizeof(lies[0]); i++) {
        const struct lie *l = &lies[i];
        int tried = 0;
        for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
            if (!(l->kinds & (int)kind))
                continue;
            for (int v = 0; v < 2; v++)
                for (enum op op = 0; op < NOPS; op++)
                    if (detects(l->cls, op))
                        for (int nb = 0; nb < 2; nb++) {
                            one_lie(l, kind, v, op, nb);
                            tried++;
                        }
        }
        CHECK(tried > 0);
        char name[96];
        snprintf(name, sizeof(name), "lie_%s (%d cases)", l->name, tried);
        OK(name);
    }
}

/* Honest records next to lies: the valid limit cases are accepted. */
static void test_truths(void)
{
    struct pair pr;
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    uint8_t *m = raw_map(&pr);
    struct circuit_dir_ctrl *d1 = raw_dir(m, 1);
    uint8_t *data = raw_data(&pr, m, 1);
    uint8_t buf[RING];
    void *p;
    /* A forged but well-formed record is just data. */
    struct circuit_record h = {.len = 8, .reserved = 0};
    memcpy(data, &h, 8);
    memcpy(data + 8, "12345678", 8);
    d1->prod = 16;
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), 8);
    CHECK(memcmp(buf, "12345678", 8) == 0);
    /* A record exactly filling the ring, crossing its end. */
    h.len = RING - 8;
    memcpy(data + 16, &h, 8);
    d1->prod = 16 + RING;
    CHECK_EQ(circuit_peek(pr.c[0], 0, CIRCUIT_FOREVER, &p), RING - 8);
    /* Rewriting the header after the peek changes nothing already checked. */
    h.len = UINT32_MAX;
    memcpy(data + 16, &h, 8);
    CHECK_EQ(circuit_consume(pr.c[0], RING - 8), 0);
    CHECK_EQ(circuit_bytes_received(pr.c[0]), 16 + RING);
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
             -EAGAIN);
    /* A state moving backwards is ignored, not believed. */
    raw_hdr(m)->side[1].state = CIRCUIT_WRITE_SHUT;
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    raw_hdr(m)->side[1].state = CIRCUIT_OPEN;
    CHECK_EQ(circuit_recv(pr.c[0], buf, sizeof(buf), 0, CIRCUIT_FOREVER), -ESHUTDOWN);
    CHECK_EQ(raw_hdr(m)->side[0].state, CIRCUIT_OPEN);
    raw_unmap(&pr, m);
    pair_close(&pr);
    OK("well_formed_forgeries_accepted");
}

/* A lie delivered to a sleeping victim wakes it with a reset. */
struct sleeper {
    struct circuit *c;
    enum op op;
    pid_t tid;
    ssize_t rc;
};

static void *sleeper_main(void *arg)
{
    struct sleeper *s = arg;
    __atomic_store_n(&s->tid, gettid(), __ATOMIC_RELEASE);
    s->rc = call(s->c, s->op, 0);
    return NULL;
}

static void test_lie_to_sleeper(void)
{
    for (int which = 0; which < 3; which++) {
        struct pair pr;
        pair_open(&pr, which == 1 ? CIRCUIT_DGRAM : CIRCUIT_STREAM, RING, RING);
        circuit_set_spin(pr.c[0], 0);
        uint8_t *m = raw_map(&pr);
        enum op op = which == 2 ? OP_SEND : OP_RECV;
        if (op == OP_SEND) {
            static uint8_t full[RING];
            CHECK_EQ(circuit_send(pr.c[0], full, RING, 0, CIRCUIT_FOREVER), RING);
        }
        struct sleeper s = {pr.c[0], op, 0, 0};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, sleeper_main, &s) == 0);
        while (!__atomic_load_n(&s.tid, __ATOMIC_ACQUIRE))
            sleep_ms(1);
        wait_sleeping(s.tid);
        if (which == 0)
            raw_dir(m, 1)->prod = RING + 1;
        else if (which == 1)
            raw_dir(m, 1)->prod = 4;
        else
            raw_dir(m, 0)->cons = RING + 8;
        /* Ring the victim's doorbell as the liar would: through its
         * peer_bell, the ringing end of the victim's doorbell it holds. */
        bell_ring(pr.peer_bell[1]);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_EQ(s.rc, -ECONNRESET);
        raw_unmap(&pr, m);
        pair_close(&pr);
    }
    OK("lie_wakes_sleeper_with_reset");
}

/*
 * A broken circuit is never written again: once the victim aborted for a
 * violation, no call of its (consume of a view taken before, arm, ending
 * calls) writes an index, a flag or a state.
 */
static void test_broken_never_written(void)
{
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        struct pair pr;
        pair_open(&pr, kind, RING, RING);
        uint8_t *m = raw_map(&pr);
        struct circuit *v = pr.c[0];
        uint8_t buf[64];
        void *p;
        CHECK_EQ(circuit_send(pr.c[1], "abcdefgh", 8, 0, CIRCUIT_FOREVER), 8);
        CHECK_EQ(circuit_peek(v, 0, CIRCUIT_FOREVER, &p), 8);
        /* The liar breaks the other direction; the victim finds out sending. */
        raw_dir(m, 0)->cons = kind == CIRCUIT_DGRAM ? 8 : 1;
        CHECK_EQ(circuit_send(v, "x", 1, 0, CIRCUIT_FOREVER), -ECONNRESET);
        CHECK_EQ(raw_hdr(m)->side[0].state, CIRCUIT_ABORTED);
        /* The liar lowers every flag and rewrites our state: any write of
         * ours would show. */
        raw_dir(m, 0)->prod_wait = raw_dir(m, 0)->cons_wait = 0;
        raw_dir(m, 1)->prod_wait = raw_dir(m, 1)->cons_wait = 0;
        raw_hdr(m)->side[0].state = CIRCUIT_OPEN;
        static uint8_t snap[CIRCUIT_DATA_OFFSET];
        memcpy(snap, m, sizeof(snap));
        CHECK_EQ(circuit_consume(v, 8), -ECONNRESET);
        CHECK_EQ(circuit_arm_read(v), CIRCUIT_READABLE);
        CHECK_EQ(circuit_recv(v, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
                 -ECONNRESET);
        CHECK_EQ(circuit_peek(v, 0, CIRCUIT_FOREVER, &p), -ECONNRESET);
        CHECK_EQ(circuit_reserve(v, 1, 0, CIRCUIT_FOREVER, &p), -ECONNRESET);
        CHECK(circuit_commit(v, 0) < 0);
        CHECK(circuit_poll(v) & CIRCUIT_HANGUP);
        CHECK_EQ(circuit_shutdown_write(v), 0);
        CHECK_EQ(circuit_abort(v), 0);
        CHECK(memcmp(snap, m, sizeof(snap)) == 0);
        CHECK_EQ(circuit_close(v), 0);
        CHECK(memcmp(snap, m, sizeof(snap)) == 0);
        CHECK_EQ(circuit_bytes_received(v), 0);
        raw_unmap(&pr, m);
        pair_close(&pr);
    }
    OK("broken_circuit_never_written");
}

/* --- Fd games: what the peer can do with the doorbell socket it shares. --- */

static void set_blocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    CHECK(fl >= 0);
    CHECK(fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == 0);
    CHECK(!(fcntl(fd, F_GETFL) & O_NONBLOCK));
}

static ino_t inode(int fd)
{
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    return st.st_ino;
}

/* Send on fd (without waiting) until its peer's queue is full. */
static size_t fill_socket(int fd)
{
    static const char junk[4096];
    size_t total = 0;
    for (size_t chunk = sizeof(junk); chunk; chunk /= 8) {
        ssize_t n;
        while ((n = send(fd, junk, chunk, MSG_DONTWAIT | MSG_NOSIGNAL)) > 0)
            total += (size_t)n;
        CHECK(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
    }
    CHECK(send(fd, junk, 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno == EAGAIN);
    return total;
}

#define BOUNDED(expr, want, max_ms)                                            \
    do {                                                                       \
        int64_t t0_ = now_ns();                                                \
        CHECK_EQ((expr), (want));                                              \
        CHECK(now_ns() - t0_ < (int64_t)(max_ms) * 1000000LL);                 \
    } while (0)

/*
 * The peer (side 1) holds a duplicate of our doorbell's ringing end Y0
 * (its peer_bell) and shares with us the description of its own Y1 (our
 * peer_bell).  It clears O_NONBLOCK on every description it can reach,
 * and fills both doorbell queues.  It cannot reach X0, the end we sleep
 * on.  None of our calls may block beyond its deadline, nor fail.
 */
static void test_fd_games(void)
{
    static uint8_t buf[RING];
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    circuit_set_spin(pr.c[0], 0);
    struct circuit *v = pr.c[0], *h = pr.c[1];
    /* The design gives the peer no handle on X0: none of its fds is X0. */
    const ino_t x0 = inode(pr.bell[0]);
    CHECK(inode(pr.bell[1]) != x0 && inode(pr.self_bell[1]) != x0 &&
          inode(pr.peer_bell[1]) != x0);
    CHECK_EQ(inode(pr.peer_bell[1]), inode(pr.self_bell[0])); /* Y0, shared */
    CHECK_EQ(inode(pr.peer_bell[0]), inode(pr.self_bell[1])); /* Y1, shared */
    /* Every description made blocking: the peer's, and even ours. */
    for (int s = 0; s < 2; s++) {
        set_blocking(pr.bell[s]);
        set_blocking(pr.self_bell[s]);
        set_blocking(pr.peer_bell[s]);
    }
    /* Our waits end on time; non-blocking calls return at once. */
    int64_t t0 = now_ns();
    CHECK_EQ(circuit_recv(v, buf, sizeof(buf), 0, in_ms(100)), -ETIMEDOUT);
    int64_t took = now_ns() - t0;
    CHECK(took >= 100 * 1000000LL && took < 1000 * 1000000LL);
    BOUNDED(circuit_recv(v, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN, 100);
    void *p;
    BOUNDED(circuit_peek(v, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &p), -EAGAIN, 100);
    CHECK_EQ(circuit_arm_read(v), 0);

    /* The peer's doorbell queue full (rung by a dup of Y1, as ours is):
     * our rings meet a full, blocking socket and must not wait. */
    CHECK(fill_socket(pr.peer_bell[0]) > 0);
    BOUNDED(circuit_send(v, "abc", 3, 0, CIRCUIT_FOREVER), 3, 100); /* rings h */
    BOUNDED(circuit_send(v, buf, RING, 0, in_ms(2000)), RING - 3, 100);
    BOUNDED(circuit_send(v, buf, 1, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN, 100);
    t0 = now_ns();
    CHECK_EQ(circuit_send(v, buf, 1, 0, in_ms(100)), -ETIMEDOUT);
    CHECK(now_ns() - t0 < 1000 * 1000000LL);
    /* Our own doorbell flooded by the peer too (through its dup of Y0). */
    CHECK(fill_socket(pr.peer_bell[1]) > 0);
    t0 = now_ns();
    CHECK_EQ(circuit_recv(v, buf, sizeof(buf), 0, in_ms(100)), -ETIMEDOUT);
    CHECK(now_ns() - t0 < 1000 * 1000000LL);
    BOUNDED(circuit_recv(v, buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER), -EAGAIN, 100);
    BOUNDED(circuit_arm_read(v), 0, 100);
    /* The flood is rings in vain: data still flows both ways, and rings
     * still get through once the peer drains its own doorbell. */
    CHECK_EQ(circuit_recv(h, buf, sizeof(buf), CIRCUIT_ALL, CIRCUIT_FOREVER), RING);
    CHECK_EQ(circuit_send(h, "back", 4, 0, CIRCUIT_FOREVER), 4);
    BOUNDED(circuit_recv(v, buf, sizeof(buf), 0, in_ms(2000)), 4, 1000);
    CHECK(memcmp(buf, "back", 4) == 0);
    /* Ending rings both doorbells, full or not: still no wait. */
    BOUNDED(circuit_shutdown_write(v), 0, 100);
    BOUNDED(circuit_abort(v), 0, 100);
    BOUNDED(circuit_close(v), 0, 100);
    CHECK_EQ(circuit_recv(h, buf, sizeof(buf), 0, in_ms(2000)), -ECONNRESET);
    pair_close(&pr);
    OK("fd_games_never_block");
}

struct sleeper2 {
    struct circuit *c;
    int send;
    pid_t tid;
    ssize_t rc;
    int64_t took;
};

static void *sleeper2_main(void *arg)
{
    struct sleeper2 *s = arg;
    static uint8_t buf[RING];
    __atomic_store_n(&s->tid, gettid(), __ATOMIC_RELEASE);
    int64_t t0 = now_ns();
    s->rc = s->send ? circuit_send(s->c, buf, 1, 0, in_ms(5000))
                    : circuit_recv(s->c, buf, sizeof(buf), 0, in_ms(5000));
    s->took = now_ns() - t0;
    return NULL;
}

/*
 * The peer shuts down its ringing end of our doorbell (a dup of Y0): it can
 * no longer ring us, and our bell reads end of file for ever.  We take the
 * peer as gone: data it sent is still received, then -ECONNRESET; no call
 * hangs, and nothing spins on the ever-readable bell.
 */
static void test_peer_shuts_doorbell(void)
{
    static uint8_t buf[RING];
    /* Idle victim: its poll and its calls see the hang-up. */
    struct pair pr;
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    circuit_set_spin(pr.c[0], 0);
    CHECK_EQ(circuit_send(pr.c[1], "last", 4, 0, CIRCUIT_FOREVER), 4);
    CHECK_EQ(circuit_arm_read(pr.c[0]), CIRCUIT_READABLE);
    CHECK_EQ(shutdown(pr.peer_bell[1], SHUT_RDWR), 0);
    CHECK(fd_readable(pr.bell[0])); /* end of file: readable for ever */
    int mask = circuit_poll(pr.c[0]);
    CHECK(mask & CIRCUIT_READABLE);
    CHECK(mask & CIRCUIT_HANGUP);
    BOUNDED(circuit_recv(pr.c[0], buf, sizeof(buf), 0, in_ms(2000)), 4, 1000);
    CHECK(memcmp(buf, "last", 4) == 0);
    BOUNDED(circuit_recv(pr.c[0], buf, sizeof(buf), 0, in_ms(2000)), -ECONNRESET, 1000);
    BOUNDED(circuit_recv(pr.c[0], buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
            -ECONNRESET, 100);
    BOUNDED(circuit_send(pr.c[0], "x", 1, 0, in_ms(2000)), -ECONNRESET, 1000);
    CHECK_EQ(circuit_arm_read(pr.c[0]), CIRCUIT_READABLE);
    BOUNDED(circuit_close(pr.c[0]), 0, 100);
    pair_close(&pr);

    /* Sleeping victims, a receiver and a sender on a full ring: woken,
     * reset, and never busy while they waited. */
    for (int send = 0; send < 2; send++) {
        pair_open(&pr, CIRCUIT_STREAM, RING, RING);
        circuit_set_spin(pr.c[0], 0);
        if (send)
            CHECK_EQ(circuit_send(pr.c[0], buf, RING, 0, CIRCUIT_FOREVER), RING);
        struct sleeper2 s = {.c = pr.c[0], .send = send};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, sleeper2_main, &s) == 0);
        while (!__atomic_load_n(&s.tid, __ATOMIC_ACQUIRE))
            sleep_ms(1);
        wait_sleeping(s.tid);
        CHECK_EQ(shutdown(pr.peer_bell[1], SHUT_RDWR), 0);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_EQ(s.rc, -ECONNRESET);
        CHECK(s.took < 1000 * 1000000LL);
        CHECK(circuit_poll(pr.c[0]) & CIRCUIT_HANGUP);
        pair_close(&pr);
    }

    /* Nothing to receive: a poller's bell reads end of file for ever, and
     * circuit_poll must say why (hang-up, a receive fails at once), or a
     * poller deciding by it would spin.  Arming does not hide it either. */
    pair_open(&pr, CIRCUIT_STREAM, RING, RING);
    CHECK_EQ(circuit_poll(pr.c[0]), CIRCUIT_WRITABLE);
    CHECK_EQ(circuit_arm_read(pr.c[0]), 0);
    CHECK_EQ(shutdown(pr.peer_bell[1], SHUT_RDWR), 0);
    CHECK(fd_readable(pr.bell[0]));
    CHECK_EQ(circuit_poll(pr.c[0]), CIRCUIT_READABLE | CIRCUIT_WRITABLE | CIRCUIT_HANGUP);
    CHECK_EQ(circuit_arm_read(pr.c[0]), CIRCUIT_READABLE);
    CHECK(fd_readable(pr.bell[0]));
    BOUNDED(circuit_recv(pr.c[0], buf, sizeof(buf), CIRCUIT_NONBLOCK, CIRCUIT_FOREVER),
            -ECONNRESET, 100);
    pair_close(&pr);

    /* Half shut (SHUT_WR only) is the same: the peer can no longer ring. */
    pair_open(&pr, CIRCUIT_DGRAM, RING, RING);
    CHECK_EQ(shutdown(pr.peer_bell[1], SHUT_WR), 0);
    BOUNDED(circuit_recv(pr.c[0], buf, sizeof(buf), 0, in_ms(2000)), -ECONNRESET, 1000);
    pair_close(&pr);
    OK("peer_shuts_our_doorbell");
}

/* --- Random scribbling. --- */

struct fuzz {
    struct pair pr;
    uint8_t *m;
    int live;
    int mild; /* this pair: only plausible lies, and seldom */
    uint64_t seed;
    unsigned long pairs, calls, resets, ends, successes;
};

static void fuzz_open(struct fuzz *f)
{
    uint32_t kind = rnd(&f->seed) & 1 ? CIRCUIT_DGRAM : CIRCUIT_STREAM;
    uint64_t s0 = RING << (rnd(&f->seed) % 2), s1 = RING << (rnd(&f->seed) % 2);
    pair_open(&f->pr, kind, s0, s1);
    f->m = raw_map(&f->pr);
    f->live = 1;
    f->mild = (int)(rnd(&f->seed) & 1);
    f->pairs++;
}

static void fuzz_close(struct fuzz *f)
{
    raw_unmap(&f->pr, f->m);
    pair_close(&f->pr);
    f->live = 0;
}

/* A value near where an index of direction d could honestly be. */
static uint64_t near_index(struct fuzz *f, int d)
{
    uint64_t size = f->pr.p.size[d];
    uint64_t base = rnd(&f->seed) & 1 ? circuit_bytes_sent(f->pr.c[d])
                                      : circuit_bytes_received(f->pr.c[1 - d]);
    uint64_t v = base + rnd(&f->seed) % (size + 32) - 16;
    if (f->pr.p.kind == CIRCUIT_DGRAM && rnd(&f->seed) % 4)
        v &= ~7ull;
    return v;
}

static void scribble(struct fuzz *f)
{
    uint8_t *m = f->m;
    int d = (int)(rnd(&f->seed) & 1);
    struct circuit_dir_ctrl *dc = raw_dir(m, d);
    uint64_t size = f->pr.p.size[d];
    uint8_t *data = raw_data(&f->pr, m, d);
    unsigned what = (unsigned)(rnd(&f->seed) % 10);
    if (f->mild && (what <= 1 || what == 4))
        return; /* no wild words, no states */
    switch (what) {
    case 0: { /* a random 64-bit value at a random spot of header or control */
        uint64_t off = rnd(&f->seed) % (CIRCUIT_DATA_OFFSET / 8) * 8;
        uint64_t v = rnd(&f->seed);
        memcpy(m + off, &v, 8);
        break;
    }
    case 1: { /* the same in the hot lines only (start of each 128-byte line) */
        uint64_t off = CIRCUIT_CTRL_OFFSET + rnd(&f->seed) % 6 * CIRCUIT_LINE;
        uint64_t v = rnd(&f->seed);
        memcpy(m + off, &v, 8);
        break;
    }
    case 2:
        dc->prod = near_index(f, d);
        break;
    case 3:
        dc->cons = near_index(f, d);
        break;
    case 4: /* a state, mostly a valid one */
        raw_hdr(m)->side[d].state =
            rnd(&f->seed) % 8 ? (uint32_t)(rnd(&f->seed) % 5) : (uint32_t)rnd(&f->seed);
        break;
    case 5:
        dc->cons_wait = (uint32_t)rnd(&f->seed);
        dc->prod_wait = (uint32_t)rnd(&f->seed);
        break;
    case 6:
    case 7: { /* random bytes in a data area */
        uint64_t off = rnd(&f->seed) % size;
        unsigned n = 1 + (unsigned)(rnd(&f->seed) % 16);
        for (unsigned i = 0; i < n && off + i < size; i++)
            data[off + i] = (uint8_t)rnd(&f->seed);
        break;
    }
    case 8: { /* a plausible record where the consumer reads next, then publish */
        uint64_t at = circuit_bytes_received(f->pr.c[1 - d]);
        uint64_t r = rnd(&f->seed);
        struct circuit_record h = {
            .len = (uint32_t)(r % 4 ? rnd(&f->seed) % (size + 16) : rnd(&f->seed)),
            .reserved = r % 16 ? 0 : (uint32_t)rnd(&f->seed)};
        uint8_t bytes[8];
        memcpy(bytes, &h, 8);
        for (int i = 0; i < 8; i++) /* our raw map has no mirror: wrap by hand */
            data[(at + i) & (size - 1)] = bytes[i];
        dc->prod = at + (rnd(&f->seed) % 2 ? record(h.len) : (rnd(&f->seed) % (size + 16)));
        break;
    }
    default: /* nothing this time: let honest traffic happen */
        break;
    }
}

/* One call on side s with everything it returns checked against the contract. */
static ssize_t fuzz_call(struct fuzz *f, int s, int op)
{
    struct circuit *c = f->pr.c[s];
    const int dgram = f->pr.p.kind == CIRCUIT_DGRAM;
    const uint64_t txsize = circuit_area_size(c, 0), rxsize = circuit_area_size(c, 1);
    const uint64_t max = txsize - 8;
    const uint64_t sent0 = circuit_bytes_sent(c), got0 = circuit_bytes_received(c);
    int flags = CIRCUIT_NONBLOCK | (rnd(&f->seed) % 4 == 0 ? CIRCUIT_ALL : 0);
    ssize_t rc;
    void *p = NULL;
    f->calls++;
    switch (op) {
    case 0: { /* send */
        size_t len = (size_t)(rnd(&f->seed) % (dgram ? max + 16 : 2 * txsize + 1));
        uint8_t *buf = malloc(len ? len : 1);
        CHECK(buf);
        memset(buf, 0x5a, len);
        rc = circuit_send(c, buf, len, flags, CIRCUIT_FOREVER);
        free(buf);
        if (rc >= 0) {
            if (dgram) {
                CHECK_EQ(rc, len);
                CHECK_EQ(circuit_bytes_sent(c) - sent0, record(len));
            } else {
                CHECK((size_t)rc <= len && (rc > 0 || len == 0));
                CHECK_EQ(circuit_bytes_sent(c) - sent0, rc);
            }
        } else {
            CHECK(rc == -EAGAIN || rc == -EPIPE || rc == -ECONNRESET ||
                  (rc == -EMSGSIZE && dgram && len > max));
            CHECK_EQ(circuit_bytes_sent(c), sent0);
        }
        return rc;
    }
    case 1: { /* recv into a buffer of exactly the asked size (ASan guards it) */
        size_t len = (size_t)(rnd(&f->seed) % (rxsize + 64));
        uint8_t *buf = malloc(len ? len : 1);
        CHECK(buf);
        rc = circuit_recv(c, len ? buf : NULL, len, flags, CIRCUIT_FOREVER);
        free(buf);
        if (rc >= 0) {
            if (dgram) {
                CHECK((uint64_t)rc <= rxsize - 8);
                CHECK_EQ(circuit_bytes_received(c) - got0, record((uint64_t)rc));
            } else {
                CHECK((size_t)rc <= len && (rc > 0 || len == 0));
                CHECK_EQ(circuit_bytes_received(c) - got0, rc);
            }
        } else {
            CHECK(rc == -EAGAIN || rc == -ESHUTDOWN || rc == -ECONNRESET);
            CHECK_EQ(circuit_bytes_received(c), got0);
        }
        return rc;
    }
    case 2: { /* peek, read the whole view, consume */
        rc = circuit_peek(c, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &p);
        if (rc < 0) {
            CHECK(rc == -EAGAIN || rc == -ESHUTDOWN || rc == -ECONNRESET);
            return rc;
        }
        uint8_t *base = circuit_area_base(c, 1), *v = p;
        CHECK(v >= base && v < base + rxsize);
        CHECK(v + rc <= base + 2 * rxsize);
        if (dgram)
            CHECK((uint64_t)rc <= rxsize - 8);
        else
            CHECK(rc >= 1 && (uint64_t)rc <= rxsize);
        volatile uint8_t sum = 0;
        for (ssize_t i = 0; i < rc; i++)
            sum ^= v[i];
        (void)sum;
        size_t n = dgram ? (size_t)rc : (size_t)(rnd(&f->seed) % ((uint64_t)rc + 1));
        CHECK_EQ(circuit_consume(c, n), 0);
        CHECK_EQ(circuit_bytes_received(c) - got0, dgram ? record(n) : n);
        return rc;
    }
    case 3: { /* reserve, fill the whole span, commit part of it */
        size_t need = (size_t)(rnd(&f->seed) % (dgram ? max + 16 : txsize + 1));
        rc = circuit_reserve(c, need, CIRCUIT_NONBLOCK, CIRCUIT_FOREVER, &p);
        if (rc < 0) {
            CHECK(rc == -EAGAIN || rc == -EPIPE || rc == -ECONNRESET ||
                  (rc == -EMSGSIZE && dgram && need > max));
            return rc;
        }
        uint8_t *base = circuit_area_base(c, 0), *v = p;
        CHECK(v >= base && v < base + txsize);
        CHECK(v + rc <= base + 2 * txsize);
        CHECK((uint64_t)rc >= need && (uint64_t)rc <= (dgram ? max : txsize));
        memset(v, 0xa5, (size_t)rc);
        size_t n = (size_t)(rnd(&f->seed) % ((uint64_t)rc + 1));
        int crc = circuit_commit(c, n);
        CHECK(crc == 0 || crc == -EPIPE || crc == -ECONNRESET);
        if (crc == 0)
            CHECK_EQ(circuit_bytes_sent(c) - sent0, dgram ? record(n) : n);
        return crc ? crc : rc;
    }
    case 4: {
        int mask = circuit_poll(c);
        CHECK(mask >= 0 && mask <= 7);
        return 0;
    }
    default: {
        int a = circuit_arm_read(c);
        CHECK(a == 0 || a == CIRCUIT_READABLE);
        return 0;
    }
    }
}

static void test_fuzz(uint64_t seed, unsigned iters)
{
    struct fuzz f = {.seed = seed};
    unsigned since_open = 0;
    for (unsigned it = 0; it < iters; it++) {
        if (!f.live || since_open++ > 2000) {
            if (f.live)
                fuzz_close(&f);
            fuzz_open(&f);
            since_open = 0;
        }
        unsigned k = f.mild ? (rnd(&f.seed) % 8 == 0) : (unsigned)(rnd(&f.seed) % 3);
        for (unsigned i = 0; i < k; i++)
            scribble(&f);
        int s = (int)(rnd(&f.seed) & 1);
        int op = (int)(rnd(&f.seed) % 6);
        ssize_t rc = fuzz_call(&f, s, op);
        if (rc >= 0 && op < 4)
            f.successes++;
        if (rc == -ECONNRESET) {
            /* Once reset, the same call stays reset. */
            f.resets++;
            static const enum op same[] = {OP_SEND, OP_RECV, OP_PEEK, OP_RESERVE};
            ssize_t again = call(f.pr.c[s], same[op], 1);
            if (again != -ECONNRESET)
                fprintf(stderr, "iter %u side %d op %d kind %u: reset, then %zd\n", it, s,
                        op, f.pr.p.kind, again);
            CHECK_EQ(again, -ECONNRESET);
            fuzz_close(&f);
        } else if (rc == -EPIPE || rc == -ESHUTDOWN) {
            f.ends++;
            fuzz_close(&f);
        }
    }
    if (f.live)
        fuzz_close(&f);
    printf("# fuzz seed %#" PRIx64 ": %u iterations, %lu pairs, %lu calls, %lu succeeded, "
           "%lu resets, %lu ends\n",
           seed, iters, f.pairs, f.calls, f.successes, f.resets, f.ends);
    /* The scribbler must not have made the run trivial. */
    CHECK(f.successes > iters / 10);
    CHECK(f.resets > 100);
    OK("random_scribble");
}

int main(int argc, char **argv)
{
    alarm(30);
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 0) : 0x5eed1234abcdull;
    unsigned iters = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 20000;
    test_lies();
    test_truths();
    test_lie_to_sleeper();
    test_broken_never_written();
    test_fd_games();
    test_peer_shuts_doorbell();
    test_fuzz(seed, iters);
    return 0;
}
