/*
 * map.c - creating a circuit object and attaching an endpoint to it.
 *
 * The object is a sealed memfd: once sealed, no holder (the peer included) can
 * shrink it, so a mapped page can never turn into SIGBUS under us.  Each data
 * area is mapped twice, back to back (the mirror mapping): the span
 * [i & mask, (i & mask) + size) is always contiguous, so readers and writers
 * never split a copy, a record or a zero-copy view at the wrap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_SPIN_NS 50000u
#define REQUIRED_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

/* Spinning only pays with another CPU to run the peer.  Asked once: the
 * answer costs an open and a read of /sys, a good part of a setup. */
uint32_t circuit_default_spin(void)
{
    static int cpus; /* 0: not asked yet */
    int n = __atomic_load_n(&cpus, __ATOMIC_RELAXED);
    if (!n) {
        n = (int)sysconf(_SC_NPROCESSORS_ONLN);
        __atomic_store_n(&cpus, n > 0 ? n : 1, __ATOMIC_RELAXED);
    }
    return n > 1 ? DEFAULT_SPIN_NS : 0;
}

static bool valid_ring_size(uint64_t n)
{
    return n >= CIRCUIT_MIN_RING && n <= CIRCUIT_MAX_RING && (n & (n - 1)) == 0;
}

uint64_t circuit_object_size(const struct circuit_params *p)
{
    if (p->kind != CIRCUIT_STREAM && p->kind != CIRCUIT_DGRAM)
        return 0;
    if (!valid_ring_size(p->size[0]) || !valid_ring_size(p->size[1]))
        return 0;
    return CIRCUIT_DATA_OFFSET + p->size[0] + p->size[1];
}

/* The header a correct object for params has. */
static void expected_header(const struct circuit_params *p, struct circuit_header *h)
{
    memset(h, 0, sizeof(*h));
    h->magic = CIRCUIT_MAGIC;
    h->version = CIRCUIT_VERSION;
    h->kind = (uint16_t)p->kind;
    h->header_size = CIRCUIT_PAGE;
    h->total_size = circuit_object_size(p);
    h->ctrl_offset = CIRCUIT_CTRL_OFFSET;
    h->area[0].offset = CIRCUIT_DATA_OFFSET;
    h->area[0].size = p->size[0];
    h->area[1].offset = CIRCUIT_DATA_OFFSET + p->size[0];
    h->area[1].size = p->size[1];
}

/* Write the initial header and control lines with one pwrite: cheaper than
 * mapping pages a creator (the operator) never touches again, and than a
 * write per field (a setup's system calls are much of its cost). */
struct initial_pages {
    struct circuit_header h;
    struct circuit_ctrl ctrl;
};
_Static_assert(offsetof(struct initial_pages, ctrl) == CIRCUIT_CTRL_OFFSET, "ctrl after header");

static int init_object(int fd, const struct circuit_params *p)
{
    struct initial_pages init;
    memset(&init, 0, sizeof(init));
    expected_header(p, &init.h);
    /* Both consumers start armed: the first data rings even a poller that
     * never called in (docs/circuit-format.md, "Doorbells"). */
    for (int d = 0; d < 2; d++)
        init.ctrl.dir[d].cons_wait = 1;
    return pwrite(fd, &init, sizeof(init), 0) == (ssize_t)sizeof(init) ? 0 : -EIO;
}

int circuit_create(const struct circuit_params *p)
{
    uint64_t total = circuit_object_size(p);
    if (!total)
        return -EINVAL;
    int fd = memfd_create("circuit", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    int err = 0;
    if (ftruncate(fd, (off_t)total) < 0 || fcntl(fd, F_ADD_SEALS, REQUIRED_SEALS) < 0)
        err = -errno;
    else
        err = init_object(fd, p);
    if (err) {
        close(fd);
        return err;
    }
    return fd;
}

/* The object must be sealed against resizing (seals first: only then can its
 * size not change after we look), and exactly the size params give. */
static int check_object(int memfd, uint64_t total)
{
    int seals = fcntl(memfd, F_GET_SEALS);
    if (seals < 0 || (seals & REQUIRED_SEALS) != REQUIRED_SEALS)
        return -EPROTO;
    struct stat st;
    if (fstat(memfd, &st) < 0)
        return -errno;
    if ((uint64_t)st.st_size != total)
        return -EPROTO;
    return 0;
}

/* Compare a private copy of the header, so the peer cannot change it mid-check. */
static int check_header(const struct circuit_header *shared,
                        const struct circuit_params *p)
{
    struct circuit_header want, got;
    expected_header(p, &want);
    memcpy(&got, shared, 64);
    return memcmp(&got, &want, 64) == 0 ? 0 : -EPROTO;
}

/*
 * Map the whole object with each data area twice, back to back, in one
 * reserved span and three file mappings (fewer mappings: cheaper setup and
 * teardown).  File layout: [hdr+ctrl | area0 | area1].  Span layout:
 *
 *   [hdr+ctrl | area0 | area0' | area1 | area1']
 *    `-- map 1 -------'
 *                     `- map 2 -------'
 *                                      `- map 3'
 *
 * map 1 is file [0, D + s0), map 2 is file [D, D + s0 + s1) (the mirror of
 * area0 followed by area1) and map 3 is file [D + s0, D + s0 + s1).
 */
static uint8_t *map_object(int memfd, uint64_t s0, uint64_t s1, uint64_t *span)
{
    const uint64_t d = CIRCUIT_DATA_OFFSET;
    *span = d + 2 * s0 + 2 * s1;
    uint8_t *base = mmap(NULL, *span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    const struct { uint64_t at, len, off; } maps[3] = {
        {0, d + s0, 0},
        {d + s0, s0 + s1, d},
        {d + 2 * s0 + s1, s1, d + s0},
    };
    for (int i = 0; i < 3; i++) {
        void *want = base + maps[i].at;
        if (mmap(want, maps[i].len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memfd,
                 (off_t)maps[i].off) != want) {
            munmap(base, *span);
            return NULL;
        }
    }
    return base;
}

static void init_ring(struct circuit_ring *r, struct circuit_dir_ctrl *ctrl,
                      uint8_t *data, uint64_t size)
{
    r->ctrl = ctrl;
    r->data = data;
    r->size = size;
    r->mask = size - 1;
    r->pending = 0;
    pthread_mutex_init(&r->lock, NULL);
}

static void unmap_all(struct circuit *c)
{
    if (c->map)
        munmap(c->map, c->map_size);
}

int circuit_attach(int memfd, const struct circuit_fds *fds,
                   const struct circuit_params *p, int side, struct circuit **out)
{
    uint64_t total = circuit_object_size(p);
    if (!total || (side != 0 && side != 1) || fds->bell < 0 || fds->self_bell < 0 ||
        fds->peer_bell < 0)
        return -EINVAL;
    int err = check_object(memfd, total);
    if (err)
        return err;
    struct circuit *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->side = side;
    c->kind = p->kind;
    c->bell = fds->bell;
    c->self_bell = fds->self_bell;
    c->peer_bell = fds->peer_bell;
    pthread_mutex_init(&c->bell_lock, NULL);
    pthread_mutex_init(&c->state_lock, NULL);
    c->spin_ns = circuit_default_spin();
    c->map = map_object(memfd, p->size[0], p->size[1], &c->map_size);
    if (!c->map) {
        err = -ENOMEM;
        goto fail;
    }
    c->hdr = c->map;
    c->ctrl = (struct circuit_ctrl *)((uint8_t *)c->map + CIRCUIT_CTRL_OFFSET);
    err = check_header(c->hdr, p);
    if (err)
        goto fail;
    int tx = side, rx = 1 - side;
    uint8_t *area[2] = {(uint8_t *)c->map + CIRCUIT_DATA_OFFSET,
                        (uint8_t *)c->map + CIRCUIT_DATA_OFFSET + 2 * p->size[0]};
    init_ring(&c->tx, &c->ctrl->dir[tx], area[tx], p->size[tx]);
    init_ring(&c->rx, &c->ctrl->dir[rx], area[rx], p->size[rx]);
    /* Our own indices start where the shared ones are now: an endpoint may be
     * attached after the other side began (hand-off between processes). */
    c->tx.local = load_acquire(&c->tx.ctrl->prod);
    c->tx.seen = load_acquire(&c->tx.ctrl->cons);
    c->rx.local = c->rx.seen = load_acquire(&c->rx.ctrl->cons);
    if (c->tx.local - c->tx.seen > c->tx.size ||
        (p->kind == CIRCUIT_DGRAM && ((c->tx.local | c->tx.seen | c->rx.local) & 7))) {
        err = -EPROTO;
        goto fail;
    }
    c->my_state = load_acquire(&c->hdr->side[side].state);
    if (c->my_state > CIRCUIT_ABORTED)
        c->my_state = CIRCUIT_ABORTED;
    *out = c;
    return 0;
fail:
    unmap_all(c);
    free(c);
    return err;
}

void circuit_free(struct circuit *c)
{
    if (!c)
        return;
    if (!c->closed)
        circuit_close(c);
    circuit_release_fds(c); /* no call is in flight once the owner frees */
    unmap_all(c);
    pthread_mutex_destroy(&c->tx.lock);
    pthread_mutex_destroy(&c->rx.lock);
    pthread_mutex_destroy(&c->bell_lock);
    pthread_mutex_destroy(&c->state_lock);
    free(c);
}

void circuit_set_spin(struct circuit *c, uint32_t spin_ns) { c->spin_ns = spin_ns; }
int circuit_bell(const struct circuit *c)
{
    return __atomic_load_n(&c->closed, __ATOMIC_ACQUIRE) ? -1 : c->bell;
}
int circuit_side(const struct circuit *c) { return c->side; }
uint32_t circuit_kind(const struct circuit *c) { return c->kind; }
uint64_t circuit_bytes_sent(const struct circuit *c) { return c->tx.local; }
uint64_t circuit_bytes_received(const struct circuit *c) { return c->rx.local; }

void *circuit_area_base(const struct circuit *c, int dir)
{
    return dir == 0 ? c->tx.data : c->rx.data;
}

uint64_t circuit_area_size(const struct circuit *c, int dir)
{
    return dir == 0 ? c->tx.size : c->rx.size;
}
