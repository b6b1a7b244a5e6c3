/*
 * mps_ring: a single-producer / single-consumer byte ring in POSIX shared memory.
 *
 * One segment holds one ring. The creator maps a segment (mps_segment_create), writes the
 * descriptor (mps_ring_init) and owns the name: it alone calls mps_segment_unlink. Each side,
 * in its own process, maps the segment (mps_segment_open) and attaches a local handle
 * (mps_ring_attach). Positions are byte counts that only grow; index = position & (capacity-1).
 *
 * Segment layout (offsets from the page-aligned segment base):
 *
 *     0 +------------------------------------------------------------+
 *       | descriptor: magic, layout_version, capacity, max_records,  |  written once by the
 *       | creator_pid                                                |  creator, then read-only
 *   128 +------------------------------------------------------------+
 *       | producer line: tail_position, records_committed,           |  written by the producer
 *       | producer_pid                                               |
 *   256 +------------------------------------------------------------+
 *       | producer parking: producer_waiting, space_futex            |  touched only around a
 *       |                                                            |  producer that sleeps
 *   384 +------------------------------------------------------------+
 *       | consumer line: head_position, records_released,            |  written by the consumer
 *       | consumer_pid, consumer_closed                              |
 *   512 +------------------------------------------------------------+
 *       | consumer parking: consumer_waiting, data_futex             |  touched only around a
 *       |                                                            |  consumer that sleeps
 *   640 +------------------------------------------------------------+
 *       | unused up to the data region                               |
 *  4096 +------------------------------------------------------------+
 *       | data: capacity bytes (a power of two) of records           |
 *       +------------------------------------------------------------+
 *
 * Fields written by different processes sit in separate 128-byte slots: adjacent-line
 * prefetch pairs 64-byte lines, so 64 would still share.
 *
 * A record is an 8-byte header (payload length, type) and its payload, padded so every record
 * starts on a 64-byte boundary of the data region. A record never wraps: when the claim does
 * not fit before the end, the producer first writes a PADDING record up to the end. The payload
 * of a record therefore starts MPS_RECORD_HEADER_LENGTH bytes past a 64-byte boundary.
 *
 * A DATA or SCHEMA record is claimed only while MPS_RING_CONTROL_RESERVE bytes stay free after
 * it: a full ring still takes a few control records (BARRIER, WATERMARK, STATUS, END_OF_STREAM).
 *
 * Memory: the creator reserves (posix_fallocate) only the descriptor page. The producer
 * reserves and maps the data region as its claims first reach it, MPS_RING_POPULATE_CHUNK or
 * more at a time (MADV_POPULATE_WRITE): a ring costs the memory its records reach, not its
 * capacity (a short job's 4 MiB rings took ~1 ms each to reserve), its producer takes no page
 * fault per page, and a /dev/shm that fills up meanwhile makes the claim MPS_RING_NO_SPACE, not
 * a SIGBUS. The consumer only reads what the producer wrote. Whoever creates a job's rings
 * checks up front that /dev/shm has room for all of them at full capacity.
 *
 * Waiting: a bounded spin (never longer than the call's timeout; a consumer yields its CPU once
 * first, as the producer it waits on is often the peer it just woke, queued on its CPU), then a
 * futex in the segment (shared, not FUTEX_PRIVATE). The sleeper
 * sets its "waiting" flag, re-checks, then sleeps on the futex word the other side bumps; the
 * other side publishes its position, fences, and only makes the wake syscall when the flag is
 * set. Sleeps are timed (a nap, MPS_RING_NAP_NS by default) so a sleeper notices a dead peer
 * within a nap; every timed wake-up costs CPU (about 90 us on a VM), so a user that learns of
 * dead peers otherwise (mpstream's coordinator) attaches with long naps.
 *
 * Doorbells: a consumer can also sleep on one more futex word, a doorbell another process
 * rings (mps_doorbell_ring) to get its attention: mps_ring_peek_any_or returns MPS_RING_RUNG
 * once the word differs from the value the caller read before it last looked for the reason.
 */
#ifndef MPS_RING_H
#define MPS_RING_H

#include <stdint.h>

#define MPS_RING_MAGIC 0x474e495253504dULL /* "MPSRING" little-endian */
#define MPS_RING_LAYOUT_VERSION 1
#define MPS_RING_SLOT_LENGTH 128
#define MPS_RING_DATA_OFFSET 4096
#define MPS_RING_MIN_CAPACITY 1024
#define MPS_RECORD_ALIGNMENT 64
#define MPS_RECORD_HEADER_LENGTH 8
#define MPS_RING_NAP_NS 20000000 /* default nap, 20 ms: bounds how late a sleeper sees a dead peer */
#define MPS_RING_YIELD_AFTER_NS 1000 /* a spinning waiter starts yielding its CPU after 1 us */
#define MPS_RING_MAX_WAIT_SET 128 /* rings one call can wait on: the kernel's futex_waitv limit */
/* Bytes a DATA or SCHEMA claim leaves free, so a control record (a barrier above all) never
 * waits behind a full ring for the consumer to take a batch. */
#define MPS_RING_CONTROL_RESERVE 256
/* A wait clock: the time a process waits, kept in MPS_CLOCK_WORDS int64 words that another
 * process may read while it waits (mpstream.channel.WaitClock): [0] a sequence number, odd while
 * the words change (a seqlock: a reader takes the words between two equal even numbers); [1]
 * the reason of the wait going on (0: none); [2] when it began (CLOCK_MONOTONIC ns); [2 +
 * reason] the nanoseconds waited for that reason so far. */
#define MPS_CLOCK_WORDS 5
#define MPS_WAIT_INPUT 1  /* a consumer waits for a record */
#define MPS_WAIT_CREDIT 2 /* a producer waits for space: backpressure */
/* The producer reserves the data region's memory as its records first reach it, at least this
 * many bytes at a time (see "Memory" above). */
#define MPS_RING_POPULATE_CHUNK (256u << 10)

/* Record types. Values below MPS_RECORD_USER are reserved for the ring and the engine. */
enum mps_record_type {
    MPS_RECORD_PADDING = 0,
    MPS_RECORD_DATA = 1,
    MPS_RECORD_BARRIER = 2,
    MPS_RECORD_WATERMARK = 3,
    MPS_RECORD_END_OF_STREAM = 4,
    MPS_RECORD_SCHEMA = 5,
    MPS_RECORD_STATUS = 6, /* watermark status of the channel: idle (1) or active (0) */
    MPS_RECORD_USER = 64
};

enum mps_ring_result {
    MPS_RING_OK = 0,
    MPS_RING_FULL = 1,        /* no space or no record credit now */
    MPS_RING_EMPTY = 2,       /* nothing to read now */
    MPS_RING_TIMEOUT = 3,     /* a blocking call waited its whole timeout */
    MPS_RING_CLOSED = 4,      /* the consumer closed its end */
    MPS_RING_PEER_DEAD = 5,   /* the other side's process exited while we waited on it */
    MPS_RING_TOO_LARGE = 6,   /* payload above mps_ring_max_payload_length */
    MPS_RING_INTERRUPTED = 7, /* a signal arrived while parked: return to the caller to handle it */
    MPS_RING_BAD_STATE = 8,   /* call out of order (commit without claim, release without peek) */
    MPS_RING_RUNG = 9,        /* the doorbell of mps_ring_peek_any_or rang */
    MPS_RING_NO_SPACE = 10    /* the ring's memory could not be reserved: /dev/shm (or memory) is full */
};

enum mps_ring_side { MPS_RING_PRODUCER = 0, MPS_RING_CONSUMER = 1 };

enum mps_ring_attach_result {
    MPS_ATTACH_OK = 0,
    MPS_ATTACH_BAD_MAGIC = 1,     /* not an mpstream ring */
    MPS_ATTACH_BAD_VERSION = 2,   /* written by another layout version */
    MPS_ATTACH_BAD_CAPACITY = 3,  /* capacity does not match the segment size */
    MPS_ATTACH_SIDE_TAKEN = 4,    /* another live process is attached on this side */
    MPS_ATTACH_NO_MEMORY = 5
};

/* What a consumer sees of one record. offset is the payload's index in the data region. */
struct mps_record {
    uint32_t type;
    uint32_t length;
    uint64_t offset;
};

/* Counters a handle keeps for its side; wait_ns is time parked or spinning on the peer. */
struct mps_ring_stats {
    uint64_t tail_position;
    uint64_t head_position;
    uint64_t records;
    uint64_t waits;
    uint64_t wait_ns;
};

struct mps_ring;

/* A mapped segment in this process. Reference-counted: the caller of create/open holds one
 * reference, every ring handle attached to it holds one, and the last mps_segment_release
 * unmaps it. So the order in which a garbage collector frees handles never matters. */
struct mps_segment {
    void *base;
    uint64_t length;
    int32_t refs;
};

/* Segments. Return 0 or an errno value; on success *segment_out holds one reference.
 * mps_segment_create reserves the first reserve bytes (ENOSPC now rather than a SIGBUS at a
 * store); a ring reserves its descriptor page there and its data as it goes (see "Memory"). */
int mps_segment_create(const char *name, uint64_t size, uint64_t reserve, struct mps_segment **segment_out);
int mps_segment_open(const char *name, struct mps_segment **segment_out);
void mps_segment_release(struct mps_segment *segment);
int mps_segment_unlink(const char *name);

uint64_t mps_ring_segment_length(uint64_t capacity);
uint64_t mps_ring_max_payload_length(uint64_t capacity);

/* Writes the descriptor of a fresh segment. Both positions start at start_position (0 in
 * production; tests start near the wrap). max_records bounds records in flight (0: no bound).
 * Returns 0, or EINVAL for a capacity that is not a power of two >= MPS_RING_MIN_CAPACITY. */
int mps_ring_init(void *base, uint64_t capacity, uint64_t max_records, uint64_t start_position);

/* Attaches this process as one side. On success *ring_out is a handle (holding a reference
 * to the segment) that the caller frees with mps_ring_free. A side has one live process at a time:
 * MPS_ATTACH_SIDE_TAKEN unless the slot is free, ours, or held by a dead process. A blocking
 * call spins up to spin_ns nanoseconds before it parks on the futex, in naps of nap_ns (0: the
 * default MPS_RING_NAP_NS) after each of which it checks that its peer lives. */
int mps_ring_attach(struct mps_segment *segment, int side, uint32_t spin_ns, uint64_t nap_ns,
                    struct mps_ring **ring_out);
/* Detaches, frees the handle and releases its segment reference. A consumer marks its end closed (the producer then gets
 * MPS_RING_CLOSED). The pid stays in the side's slot: a peer waiting on a writer that detached
 * without END_OF_STREAM sees it die with its process. */
void mps_ring_free(struct mps_ring *ring);

/* The blocking calls (mps_ring_claim, mps_ring_peek, mps_ring_peek_any, mps_ring_peek_any_or)
 * put a wait on clock (a wait clock's words, or NULL for none): from when the first poll finds
 * nothing until the call returns, as waiting for credit (claim) or for input (peeks). A call that
 * finds its space or record at once does not touch the clock. */

/* Producer. A claim reserves length payload bytes at mps_ring_data(ring) + *offset_out; the
 * memory is the caller's until commit or abort; nothing is visible to the consumer before
 * commit. The payload's address is MPS_RECORD_HEADER_LENGTH past a 64-byte boundary. */
int mps_ring_try_claim(struct mps_ring *ring, uint32_t type, uint32_t length, uint64_t *offset_out);
int mps_ring_claim(struct mps_ring *ring, uint32_t type, uint32_t length, int64_t timeout_ns,
                   uint64_t *offset_out, int64_t *clock);
int mps_ring_commit(struct mps_ring *ring);
/* Copies prefix_length bytes of prefix to the claimed payload's start, then commits: one call
 * for a record whose header (or whole payload) the caller holds as bytes. BAD_STATE (nothing
 * copied, the claim kept) when prefix_length exceeds the claimed length. */
int mps_ring_commit_with(struct mps_ring *ring, const char *prefix, uint32_t prefix_length);
int mps_ring_abort(struct mps_ring *ring);

/* Consumer. A peek fills *record; its payload stays valid and unchanged until release. */
int mps_ring_try_peek(struct mps_ring *ring, struct mps_record *record);
int mps_ring_peek(struct mps_ring *ring, int64_t timeout_ns, struct mps_record *record, int64_t *clock);
int mps_ring_release(struct mps_ring *ring);
/* Consumer: the position of the next record to take (the head; a held record starts there). */
uint64_t mps_ring_head(struct mps_ring *ring);
/* Consumer: looks ahead without taking anything. Fills *record with the committed record at
 * *position (skipping padding) and moves *position past it; EMPTY once *position reached the
 * committed tail. *position starts at mps_ring_head and must not fall behind it: released
 * space is the producer's again. Unaligned checkpoints copy in-flight records this way. */
int mps_ring_scan(struct mps_ring *ring, uint64_t *position, struct mps_record *record);
/* Consumer of several rings (at most MPS_RING_MAX_WAIT_SET, all consumer handles of this
 * process, none holding a record): peeks the first record found polling round-robin from
 * *index, waiting up to timeout_ns (0: do not wait, < 0: forever) on all of them at once.
 * On OK, *index is the ring that holds the record (release it there; pass *index + 1 next
 * time for fairness); on MPS_RING_PEER_DEAD, the ring whose writer died. */
int mps_ring_peek_any(struct mps_ring **rings, uint32_t count, uint32_t *index, int64_t timeout_ns,
                      struct mps_record *record, int64_t *clock);
/* The same, at most MPS_RING_MAX_WAIT_SET - 1 rings, also waking when the 32-bit doorbell word
 * (in shared memory) differs from seen: MPS_RING_RUNG. */
int mps_ring_peek_any_or(struct mps_ring **rings, uint32_t count, uint32_t *index, int64_t timeout_ns,
                         struct mps_record *record, uint32_t *doorbell, uint32_t seen, int64_t *clock);
/* In one seqlock write on clock (NULL: none): the wait going on (if any) ends now, its time
 * added to its reason's total, and one for reason (MPS_WAIT_INPUT or MPS_WAIT_CREDIT; 0: none)
 * begins. Returns the time (CLOCK_MONOTONIC ns). The ring calls' own waits and others (a
 * task's control pipe) share it: one writer of the words. */
int64_t mps_clock_switch(int64_t *clock, int64_t reason);
/* Bumps a doorbell word and wakes whoever sleeps on it. */
void mps_doorbell_ring(uint32_t *doorbell);
/* Returns a counter's value and adds one, atomically: a 64-bit word in memory that processes
 * share hands each of them different numbers 0, 1, 2, ... */
uint64_t mps_counter_next(uint64_t *word);

uint8_t *mps_ring_data(struct mps_ring *ring);
void mps_ring_get_stats(struct mps_ring *ring, struct mps_ring_stats *stats);

#endif
