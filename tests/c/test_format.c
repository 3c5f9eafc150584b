/*
 * test_format.c - the memory object: its size and layout, what create
 * refuses, and what attach refuses (a wrong, unsealed or forged object).
 */
#include "harness.h"

/* A side's doorbell fds, made as endpoint_fds() makes them: our socket
 * pair (bell, self_bell) and a ringing end of the peer's pair.  Returns the
 * peer's sleeping end, which the caller closes. */
static int make_bells(struct circuit_fds *f)
{
    int ours[2], theirs[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ours) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, theirs) == 0);
    f->bell = ours[0];
    f->self_bell = ours[1];
    f->peer_bell = theirs[1];
    return theirs[0];
}

static void close_fds(struct circuit_fds *f, int other)
{
    close(f->bell);
    close(f->self_bell);
    close(f->peer_bell);
    close(other);
}

/* attach must fail with `want` and leave our fds ours (still open). */
static void attach_fails(int memfd, const struct circuit_params *p, int side, int want)
{
    struct circuit_fds f;
    int other = make_bells(&f);
    struct circuit *c = (struct circuit *)0x1;
    CHECK_EQ(circuit_attach(memfd, &f, p, side, &c), want);
    CHECK(c == (struct circuit *)0x1);
    CHECK(fcntl(f.bell, F_GETFD) >= 0);
    CHECK(fcntl(f.self_bell, F_GETFD) >= 0);
    CHECK(fcntl(f.peer_bell, F_GETFD) >= 0);
    close_fds(&f, other);
}

/* attach must succeed; the endpoint is then freed (closing its fds). */
static void attach_works(int memfd, const struct circuit_params *p, int side)
{
    struct circuit_fds f;
    int other = make_bells(&f);
    struct circuit *c = NULL;
    CHECK_EQ(circuit_attach(memfd, &f, p, side, &c), 0);
    CHECK(c != NULL);
    CHECK_EQ(circuit_side(c), side);
    CHECK_EQ(circuit_kind(c), p->kind);
    CHECK_EQ(circuit_area_size(c, 0), p->size[side]);
    CHECK_EQ(circuit_area_size(c, 1), p->size[1 - side]);
    circuit_free(c);
    /* The endpoint owned all three and closed them (nothing else opens fds
     * in this single-threaded test, so the numbers are not reused yet). */
    CHECK(fcntl(f.bell, F_GETFD) < 0 && errno == EBADF);
    CHECK(fcntl(f.self_bell, F_GETFD) < 0 && errno == EBADF);
    CHECK(fcntl(f.peer_bell, F_GETFD) < 0 && errno == EBADF);
    close(other);
}

static void test_object_size(void)
{
    struct circuit_params p = {CIRCUIT_STREAM, {4096, 4096}};
    CHECK_EQ(circuit_object_size(&p), 8192 + 8192);
    p = (struct circuit_params){CIRCUIT_DGRAM, {65536, 1u << 20}};
    CHECK_EQ(circuit_object_size(&p), 8192 + 65536 + (1u << 20));
    p = (struct circuit_params){CIRCUIT_STREAM, {CIRCUIT_MAX_RING, CIRCUIT_MIN_RING}};
    CHECK_EQ(circuit_object_size(&p), 8192 + CIRCUIT_MAX_RING + CIRCUIT_MIN_RING);
    /* Invalid params have no size. */
    p = (struct circuit_params){CIRCUIT_STREAM, {4096, 12288}};
    CHECK_EQ(circuit_object_size(&p), 0);
    p = (struct circuit_params){0, {4096, 4096}};
    CHECK_EQ(circuit_object_size(&p), 0);
    OK("object_size");
}

static void test_create_rejects(void)
{
    static const uint64_t bad_sizes[] = {
        0, 1, 2048, 4095, 4097, 6144, 12288, 65536 + 4096,
        (uint64_t)CIRCUIT_MAX_RING * 2, (uint64_t)CIRCUIT_MAX_RING + 4096,
        1ull << 40, UINT64_MAX, 1ull << 63,
    };
    for (size_t i = 0; i < sizeof(bad_sizes) / sizeof(bad_sizes[0]); i++) {
        struct circuit_params p = {CIRCUIT_STREAM, {bad_sizes[i], 4096}};
        CHECK_EQ(circuit_create(&p), -EINVAL);
        p = (struct circuit_params){CIRCUIT_DGRAM, {4096, bad_sizes[i]}};
        CHECK_EQ(circuit_create(&p), -EINVAL);
    }
    static const uint32_t bad_kinds[] = {0, 3, 4, 0x10001, UINT32_MAX};
    for (size_t i = 0; i < sizeof(bad_kinds) / sizeof(bad_kinds[0]); i++) {
        struct circuit_params p = {bad_kinds[i], {4096, 4096}};
        CHECK_EQ(circuit_create(&p), -EINVAL);
    }
    OK("create_rejects_bad_params");
}

static void test_create_layout(void)
{
    struct circuit_params p = {CIRCUIT_DGRAM, {8192, 16384}};
    int fd = circuit_create(&p);
    CHECK(fd >= 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    CHECK_EQ(st.st_size, 8192 + 8192 + 16384);
    int seals = fcntl(fd, F_GET_SEALS);
    CHECK(seals >= 0);
    CHECK((seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)) ==
          (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL));
    CHECK(ftruncate(fd, 4096) < 0);
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);

    uint8_t *m = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    struct circuit_header *h = raw_hdr(m);
    CHECK_EQ(h->magic, CIRCUIT_MAGIC);
    CHECK(memcmp(m, "CRCT", 4) == 0);
    CHECK_EQ(h->version, CIRCUIT_VERSION);
    CHECK_EQ(h->kind, CIRCUIT_DGRAM);
    CHECK_EQ(h->header_size, CIRCUIT_PAGE);
    CHECK_EQ(h->flags, 0);
    CHECK_EQ(h->total_size, st.st_size);
    CHECK_EQ(h->ctrl_offset, CIRCUIT_CTRL_OFFSET);
    CHECK_EQ(h->area[0].offset, 8192);
    CHECK_EQ(h->area[0].size, 8192);
    CHECK_EQ(h->area[1].offset, 16384);
    CHECK_EQ(h->area[1].size, 16384);
    CHECK_EQ((uint8_t *)&h->side[0] - m, 128);
    CHECK_EQ((uint8_t *)&h->side[1] - m, 256);
    CHECK_EQ(h->side[0].state, CIRCUIT_OPEN);
    CHECK_EQ(h->side[1].state, CIRCUIT_OPEN);
    for (int d = 0; d < 2; d++) {
        struct circuit_dir_ctrl *dc = raw_dir(m, d);
        CHECK_EQ((uint8_t *)dc - m, 4096 + d * 384);
        CHECK_EQ((uint8_t *)&dc->cons - (uint8_t *)dc, 128);
        CHECK_EQ((uint8_t *)&dc->cons_wait - (uint8_t *)dc, 256);
        CHECK_EQ(dc->prod, 0);
        CHECK_EQ(dc->cons, 0);
        CHECK_EQ(dc->cons_wait, 1); /* consumers start armed */
        CHECK_EQ(dc->prod_wait, 0);
    }
    munmap(m, st.st_size);

    attach_works(fd, &p, 0);
    attach_works(fd, &p, 1);
    close(fd);
    OK("create_layout");
}

static void test_attach_rejects_params(void)
{
    struct circuit_params p = {CIRCUIT_STREAM, {8192, 4096}};
    int fd = circuit_create(&p);
    CHECK(fd >= 0);

    /* Another size: the object is not that big. */
    struct circuit_params q = {CIRCUIT_STREAM, {8192, 8192}};
    attach_fails(fd, &q, 0, -EPROTO);
    q = (struct circuit_params){CIRCUIT_STREAM, {4096, 4096}};
    attach_fails(fd, &q, 1, -EPROTO);
    /* Same total, areas swapped: only the header can tell. */
    q = (struct circuit_params){CIRCUIT_STREAM, {4096, 8192}};
    CHECK_EQ(circuit_object_size(&q), circuit_object_size(&p));
    attach_fails(fd, &q, 0, -EPROTO);
    /* Same sizes, other kind. */
    q = (struct circuit_params){CIRCUIT_DGRAM, {8192, 4096}};
    attach_fails(fd, &q, 0, -EPROTO);
    /* Invalid params or side are the caller's fault. */
    q = (struct circuit_params){CIRCUIT_STREAM, {8192, 3000}};
    attach_fails(fd, &q, 0, -EINVAL);
    q = (struct circuit_params){7, {8192, 4096}};
    attach_fails(fd, &q, 0, -EINVAL);
    attach_fails(fd, &p, 2, -EINVAL);
    attach_fails(fd, &p, -1, -EINVAL);
    attach_fails(fd, &p, 0x7fffffff, -EINVAL);

    struct circuit_fds f;
    int other = make_bells(&f);
    struct circuit *c = NULL;
    struct circuit_fds g = f;
    g.bell = -1;
    CHECK_EQ(circuit_attach(fd, &g, &p, 0, &c), -EINVAL);
    g = f;
    g.peer_bell = -1;
    CHECK_EQ(circuit_attach(fd, &g, &p, 0, &c), -EINVAL);
    /* Every doorbell fd is required: none is optional any more. */
    g = f;
    g.self_bell = -1;
    CHECK_EQ(circuit_attach(fd, &g, &p, 0, &c), -EINVAL);
    CHECK(c == NULL);
    close_fds(&f, other);

    attach_works(fd, &p, 0);
    close(fd);
    OK("attach_rejects_wrong_params");
}

static void test_attach_rejects_unsealed(void)
{
    struct circuit_params p = {CIRCUIT_STREAM, {4096, 4096}};
    int good = circuit_create(&p);
    CHECK(good >= 0);
    uint64_t total = circuit_object_size(&p);
    uint8_t *src = mmap(NULL, total, PROT_READ, MAP_SHARED, good, 0);
    CHECK(src != MAP_FAILED);

    /* A faithful copy of a good object, but unsealed: the peer could shrink
     * it under us and turn our mapping into SIGBUS. */
    int fd = memfd_create("unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)total) == 0);
    CHECK(pwrite(fd, src, total, 0) == (ssize_t)total);
    attach_fails(fd, &p, 0, -EPROTO);
    /* Partly sealed is not enough either. */
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_GROW) == 0);
    attach_fails(fd, &p, 0, -EPROTO);
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0);
    attach_fails(fd, &p, 1, -EPROTO);
    /* Fully sealed, it is as good as the original. */
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL) == 0);
    attach_works(fd, &p, 0);
    close(fd);

    /* Not sealable at all. */
    fd = memfd_create("nosealing", MFD_CLOEXEC);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)total) == 0);
    CHECK(pwrite(fd, src, total, 0) == (ssize_t)total);
    attach_fails(fd, &p, 0, -EPROTO);
    close(fd);

    /* Sealed, right size, but all zeros: no header. */
    fd = memfd_create("zeros", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)total) == 0);
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0);
    attach_fails(fd, &p, 0, -EPROTO);
    close(fd);

    munmap(src, total);
    close(good);
    OK("attach_rejects_unsealed");
}

/* Each identity field forged in turn: attach refuses, restored it accepts. */
static void test_attach_rejects_header(void)
{
    struct circuit_params p = {CIRCUIT_DGRAM, {4096, 8192}};
    int fd = circuit_create(&p);
    CHECK(fd >= 0);
    uint8_t *m = mmap(NULL, CIRCUIT_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    struct circuit_header *h = raw_hdr(m);
    struct circuit_header saved;
    memcpy(&saved, h, sizeof(saved));

#define FORGE(field, value)                                                    \
    do {                                                                       \
        h->field = (value);                                                    \
        attach_fails(fd, &p, 0, -EPROTO);                                      \
        attach_fails(fd, &p, 1, -EPROTO);                                      \
        memcpy(h, &saved, sizeof(saved));                                      \
        attach_works(fd, &p, 1);                                               \
    } while (0)

    FORGE(magic, 0x54435244u);
    FORGE(magic, 0);
    FORGE(version, 0);
    FORGE(version, 2);
    FORGE(kind, CIRCUIT_STREAM);
    FORGE(kind, 0);
    FORGE(kind, 9);
    FORGE(header_size, 8192);
    FORGE(flags, 1);
    FORGE(total_size, saved.total_size + 4096);
    FORGE(ctrl_offset, 0);
    FORGE(area[0].offset, 4096);
    FORGE(area[0].size, 8192);
    FORGE(area[1].offset, 8192);
    FORGE(area[1].size, 4096);
#undef FORGE
    /* Any single flipped bit in the identity (the first 64 bytes). */
    for (int bit = 0; bit < 64 * 8; bit++) {
        m[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        attach_fails(fd, &p, bit & 1, -EPROTO);
        m[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    attach_works(fd, &p, 0);
    munmap(m, CIRCUIT_PAGE);
    close(fd);
    OK("attach_rejects_forged_header");
}

/* Indices found at attach time must already make sense. */
static void test_attach_rejects_indices(void)
{
    for (uint32_t kind = CIRCUIT_STREAM; kind <= CIRCUIT_DGRAM; kind++) {
        struct circuit_params p = {kind, {4096, 4096}};
        int fd = circuit_create(&p);
        CHECK(fd >= 0);
        uint8_t *m = mmap(NULL, 2 * CIRCUIT_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        CHECK(m != MAP_FAILED);
        struct circuit_dir_ctrl *d0 = raw_dir(m, 0);

        /* Our tx ring holds more than it can: prod - cons > size. */
        d0->prod = 4096 + 8;
        attach_fails(fd, &p, 0, -EPROTO);
        /* cons ahead of prod. */
        d0->prod = 64;
        d0->cons = 128;
        attach_fails(fd, &p, 0, -EPROTO);
        /* A full ring far along is fine: a late attach (hand-off). */
        d0->prod = (1ull << 62) + 4096;
        d0->cons = 1ull << 62;
        attach_works(fd, &p, 0);
        /* Misaligned indices only matter to datagrams. */
        d0->prod = 1003;
        d0->cons = 1001;
        if (kind == CIRCUIT_DGRAM) {
            attach_fails(fd, &p, 0, -EPROTO);
            attach_fails(fd, &p, 1, -EPROTO); /* side 1 consumes dir 0 */
        } else {
            attach_works(fd, &p, 0);
        }
        d0->prod = d0->cons = 0;
        munmap(m, 2 * CIRCUIT_PAGE);
        close(fd);
    }
    OK("attach_rejects_impossible_indices");
}

int main(void)
{
    alarm(30);
    test_object_size();
    test_create_rejects();
    test_create_layout();
    test_attach_rejects_params();
    test_attach_rejects_unsealed();
    test_attach_rejects_header();
    test_attach_rejects_indices();
    return 0;
}
