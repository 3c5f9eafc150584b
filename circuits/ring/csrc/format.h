/*
 * format.h - the circuit memory format, version 1.
 *
 * This header is the C form of docs/circuit-format.md; the two must agree.
 * A circuit is one shared-memory object, laid out as:
 *
 *   offset 0        header page (4096 bytes): identity, sizes, side states
 *   offset 4096     control page: for each direction, three 128-byte lines
 *                   (producer index, consumer index, need-wakeup flags)
 *   offset 8192     data area of direction 0 (side 0 -> side 1), size0 bytes
 *   8192 + size0    data area of direction 1 (side 1 -> side 0), size1 bytes
 *
 * All integers are little-endian, naturally aligned.  Indices are free-running
 * 64-bit byte counters: the byte at index i lives at data[i & (size - 1)].
 * Each side writes only its own index and state; the need-wakeup flags are
 * raised by the side that sleeps and taken down by the side that rings it.
 * Every field the other side can write is validated before use (see
 * docs/circuit-format.md, "Trust").
 */
#ifndef CIRCUITS_FORMAT_H
#define CIRCUITS_FORMAT_H

#include <stdint.h>

#define CIRCUIT_MAGIC 0x54435243u /* "CRCT" as little-endian bytes */
#define CIRCUIT_VERSION 1u

#define CIRCUIT_PAGE 4096u
#define CIRCUIT_LINE 128u
#define CIRCUIT_HEADER_OFFSET 0u
#define CIRCUIT_CTRL_OFFSET CIRCUIT_PAGE
#define CIRCUIT_DATA_OFFSET (2u * CIRCUIT_PAGE)

#define CIRCUIT_MIN_RING 4096u
#define CIRCUIT_MAX_RING (64u << 20)

/* Circuit kinds (header.kind). */
#define CIRCUIT_STREAM 1u
#define CIRCUIT_DGRAM 2u

/*
 * Side states (header.side_state[s].state).  A side only ever moves its own
 * state forward: OPEN -> WRITE_SHUT -> CLOSED, or to ABORTED from any state.
 */
#define CIRCUIT_OPEN 0u       /* reading and writing */
#define CIRCUIT_WRITE_SHUT 1u /* will write no more; its ring ends at prod */
#define CIRCUIT_CLOSED 2u     /* will neither read nor write */
#define CIRCUIT_ABORTED 3u    /* reset: the peer must report ECONNRESET */

/* Datagram record header: precedes every datagram in a DGRAM ring. */
struct circuit_record {
    uint32_t len;      /* payload bytes that follow this header */
    uint32_t reserved; /* 0 in version 1 */
};
#define CIRCUIT_RECORD_ALIGN 8u

struct circuit_side_line {
    uint32_t state; /* CIRCUIT_OPEN ... CIRCUIT_ABORTED, written by its side */
    uint8_t pad[CIRCUIT_LINE - 4];
};

struct circuit_area {
    uint64_t offset; /* from the start of the object, page aligned */
    uint64_t size;   /* power of two, CIRCUIT_MIN_RING .. CIRCUIT_MAX_RING */
};

struct circuit_header {
    uint32_t magic;       /* CIRCUIT_MAGIC */
    uint16_t version;     /* CIRCUIT_VERSION */
    uint16_t kind;        /* CIRCUIT_STREAM or CIRCUIT_DGRAM */
    uint32_t header_size; /* CIRCUIT_PAGE */
    uint32_t flags;       /* 0 in version 1 */
    uint64_t total_size;  /* size of the whole object in bytes */
    uint64_t ctrl_offset; /* CIRCUIT_CTRL_OFFSET */
    struct circuit_area area[2]; /* area[d] carries direction d */
    uint8_t pad0[CIRCUIT_LINE - 64];
    struct circuit_side_line side[2]; /* at offsets 128 and 256 */
    uint8_t pad1[CIRCUIT_PAGE - 3 * CIRCUIT_LINE];
};

/* One direction's control lines: 3 x 128 bytes. */
struct circuit_dir_ctrl {
    uint64_t prod; /* bytes ever published; written by the producer */
    uint8_t pad0[CIRCUIT_LINE - 8];
    uint64_t cons; /* bytes ever consumed; written by the consumer */
    uint8_t pad1[CIRCUIT_LINE - 8];
    uint32_t cons_wait; /* consumer sleeps until prod moves; ring its doorbell */
    uint32_t prod_wait; /* producer sleeps until cons moves; ring its doorbell */
    uint8_t pad2[CIRCUIT_LINE - 8];
};

struct circuit_ctrl {
    struct circuit_dir_ctrl dir[2];
};

_Static_assert(sizeof(struct circuit_header) == CIRCUIT_PAGE, "header page");
_Static_assert(sizeof(struct circuit_dir_ctrl) == 3 * CIRCUIT_LINE, "ctrl lines");
_Static_assert(sizeof(struct circuit_record) == CIRCUIT_RECORD_ALIGN, "record");

#endif
