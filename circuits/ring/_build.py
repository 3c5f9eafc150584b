"""cffi build script for the ring's C core (API mode, out of line).

The same C sources in ``csrc/`` are compiled, unchanged, into the preload
library; this file only wraps them for Python.
"""
from pathlib import Path

from cffi import FFI

CSRC = Path("circuits/ring/csrc")
SOURCES = ["map.c", "endpoints.c", "state.c", "bell.c", "ring.c", "wait.c", "stream.c", "dgram.c", "io.c"]

CDEF = """
#define CIRCUIT_STREAM ...
#define CIRCUIT_DGRAM ...
#define CIRCUIT_OPEN ...
#define CIRCUIT_WRITE_SHUT ...
#define CIRCUIT_CLOSED ...
#define CIRCUIT_ABORTED ...
#define CIRCUIT_MIN_RING ...
#define CIRCUIT_MAX_RING ...
#define CIRCUIT_PAGE ...
#define CIRCUIT_DATA_OFFSET ...
#define CIRCUIT_NONBLOCK ...
#define CIRCUIT_ALL ...
#define CIRCUIT_READABLE ...
#define CIRCUIT_WRITABLE ...
#define CIRCUIT_HANGUP ...

struct circuit;
struct circuit_params { uint32_t kind; uint64_t size[2]; };
struct circuit_fds { int bell; int self_bell; int peer_bell; };

uint64_t circuit_object_size(const struct circuit_params *p);
int circuit_create(const struct circuit_params *p);
int circuit_create_endpoints(const struct circuit_params *p, int side0[4], int side1[4]);
struct circuit_made { int memfd; int bell[2]; int ring[2]; };
int circuit_make(const struct circuit_params *p, struct circuit_made *m);
int circuit_attach(int memfd, const struct circuit_fds *fds,
                   const struct circuit_params *p, int side, struct circuit **out);
void circuit_set_spin(struct circuit *c, uint32_t spin_ns);
ssize_t circuit_send(struct circuit *c, const char *buf, size_t len, int flags,
                     int64_t deadline);
ssize_t circuit_recv(struct circuit *c, void *buf, size_t len, int flags,
                     int64_t deadline);
ssize_t circuit_reserve(struct circuit *c, size_t need, int flags,
                        int64_t deadline, void **ptr);
int circuit_commit(struct circuit *c, size_t n);
ssize_t circuit_peek(struct circuit *c, int flags, int64_t deadline, void **ptr);
int circuit_consume(struct circuit *c, size_t n);
size_t circuit_max_dgram(const struct circuit *c);
int circuit_poll(struct circuit *c);
int circuit_arm_read(struct circuit *c);
int circuit_shutdown_write(struct circuit *c);
int circuit_abort(struct circuit *c);
int circuit_close(struct circuit *c);
int circuit_detach(struct circuit *c);
void circuit_free(struct circuit *c);
int circuit_bell(const struct circuit *c);
int circuit_side(const struct circuit *c);
uint32_t circuit_kind(const struct circuit *c);
void *circuit_area_base(const struct circuit *c, int dir);
uint64_t circuit_area_size(const struct circuit *c, int dir);
uint64_t circuit_bytes_sent(const struct circuit *c);
uint64_t circuit_bytes_received(const struct circuit *c);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "circuits.ring._ring",
    '#include "circuit.h"',
    sources=[str(CSRC / s) for s in SOURCES],
    include_dirs=[str(CSRC)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
