/* mps_ring: see mps_ring.h for the layout and the protocol. */
#define _GNU_SOURCE
#include "mps_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

/* ---- shared layout ------------------------------------------------------------------------ */

struct mps_ring_descriptor {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t reserved;
    uint64_t capacity;
    uint64_t max_records;
    int32_t creator_pid;
};

struct mps_ring_shared {
    alignas(MPS_RING_SLOT_LENGTH) struct mps_ring_descriptor descriptor;
    /* producer line */
    alignas(MPS_RING_SLOT_LENGTH) _Atomic uint64_t tail_position;
    _Atomic uint64_t records_committed;
    _Atomic int32_t producer_pid;
    /* producer parking */
    alignas(MPS_RING_SLOT_LENGTH) _Atomic uint32_t producer_waiting;
    _Atomic uint32_t space_futex;
    /* consumer line */
    alignas(MPS_RING_SLOT_LENGTH) _Atomic uint64_t head_position;
    _Atomic uint64_t records_released;
    _Atomic int32_t consumer_pid;
    _Atomic uint32_t consumer_closed;
    /* consumer parking */
    alignas(MPS_RING_SLOT_LENGTH) _Atomic uint32_t consumer_waiting;
    _Atomic uint32_t data_futex;
};

_Static_assert(offsetof(struct mps_ring_shared, descriptor) == 0, "descriptor at 0");
_Static_assert(offsetof(struct mps_ring_shared, tail_position) == 128, "producer line at 128");
_Static_assert(offsetof(struct mps_ring_shared, producer_waiting) == 256, "producer parking at 256");
_Static_assert(offsetof(struct mps_ring_shared, head_position) == 384, "consumer line at 384");
_Static_assert(offsetof(struct mps_ring_shared, consumer_waiting) == 512, "consumer parking at 512");
_Static_assert(sizeof(struct mps_ring_shared) <= MPS_RING_DATA_OFFSET, "shared block fits before data");
_Static_assert(sizeof(_Atomic uint32_t) == 4, "futex words are 32-bit");
_Static_assert(MPS_RECORD_HEADER_LENGTH <= MPS_RECORD_ALIGNMENT, "a padding record fits any gap");

struct mps_record_header {
    uint32_t length; /* payload bytes */
    uint32_t type;
};
_Static_assert(sizeof(struct mps_record_header) == MPS_RECORD_HEADER_LENGTH, "header length");

/* ---- local handle ------------------------------------------------------------------------- */

struct mps_ring {
    struct mps_segment *segment;
    struct mps_ring_shared *shared;
    uint8_t *data;
    uint64_t capacity;
    uint64_t mask;
    uint64_t max_records;
    int side;
    int64_t spin_ns;
    int64_t nap_ns;
    int peer_pidfd;
    int32_t peer_pid;
    /* producer: own tail, cached view of the consumer, the open claim */
    uint64_t tail_position;
    uint64_t records_committed;
    uint64_t cached_head_position;
    uint64_t cached_records_released;
    uint64_t populated;      /* data bytes reserved and mapped, from the start (producer_populate) */
    uint64_t claim_padding;  /* bytes of padding record before the claimed record, or 0 */
    uint64_t claim_length;   /* aligned bytes of the claimed record, 0 when no claim is open */
    uint32_t claim_type;
    uint32_t claim_payload;
    /* consumer: own head, cached view of the producer, the record held by peek */
    uint64_t head_position;
    uint64_t records_released;
    uint64_t cached_tail_position;
    uint64_t peek_length;    /* aligned bytes of the peeked record, 0 when none is held */
    /* counters */
    uint64_t waits;
    uint64_t wait_ns;
};

static inline uint64_t align_up(uint64_t value, uint64_t alignment)
{
    return (value + alignment - 1) & ~(alignment - 1);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- wait clocks (the seqlock writer; mpstream.counters reads) --------------------------- */

/* The time is read inside the seqlock write, after the odd sequence number is visible: a
 * reader that copies the words while a wait goes on counts it up to its own, later, time, and
 * the wait's end must not come out earlier than that (the time waited would go back). */
int64_t mps_clock_switch(int64_t *clock, int64_t reason)
{
    if (clock == NULL)
        return now_ns();
    _Atomic int64_t *words = (_Atomic int64_t *)clock;
    int64_t was = atomic_load_explicit(&words[1], memory_order_relaxed);
    if (was != MPS_WAIT_INPUT && was != MPS_WAIT_CREDIT)
        was = 0;
    if (was == 0 && reason == 0)
        return now_ns(); /* nothing to end or begin: the words stay as they are */
    int64_t seq = atomic_load_explicit(&words[0], memory_order_relaxed);
    atomic_store_explicit(&words[0], seq + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    int64_t now = now_ns();
    if (was) {
        int64_t total = atomic_load_explicit(&words[2 + was], memory_order_relaxed);
        int64_t since = atomic_load_explicit(&words[2], memory_order_relaxed);
        atomic_store_explicit(&words[2 + was], total + (now - since), memory_order_relaxed);
    }
    atomic_store_explicit(&words[2], now, memory_order_relaxed);
    atomic_store_explicit(&words[1], reason, memory_order_relaxed);
    atomic_store_explicit(&words[0], seq + 2, memory_order_release);
    return now;
}

/* Futexes here are shared (never FUTEX_PRIVATE_FLAG): the two sides are different processes. */
static void futex_wake(_Atomic uint32_t *word)
{
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* The waker's half of the protocol: our position store is ordered before reading the flag. */
static void wake_if_waiting(_Atomic uint32_t *waiting, _Atomic uint32_t *futex_word)
{
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(waiting, memory_order_relaxed)) {
        atomic_fetch_add_explicit(futex_word, 1, memory_order_release);
        futex_wake(futex_word);
    }
}

/* A pidfd turns readable when the process exits, zombie or reaped, and never names a reused
 * pid once open: kill(pid, 0) would see an unreaped child as alive. */
static bool peer_is_dead(struct mps_ring *ring)
{
    _Atomic int32_t *slot = ring->side == MPS_RING_PRODUCER ? &ring->shared->consumer_pid
                                                            : &ring->shared->producer_pid;
    int32_t pid = atomic_load_explicit(slot, memory_order_acquire);
    if (pid <= 0)
        return false; /* no peer attached (yet, or it detached cleanly) */
    if (pid != ring->peer_pid) {
        if (ring->peer_pidfd >= 0)
            close(ring->peer_pidfd);
        ring->peer_pid = pid;
        ring->peer_pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (ring->peer_pidfd < 0)
            return errno == ESRCH;
    }
    if (ring->peer_pidfd < 0)
        return false;
    struct pollfd pfd = {.fd = ring->peer_pidfd, .events = POLLIN};
    return poll(&pfd, 1, 0) > 0;
}

/* ---- segments ----------------------------------------------------------------------------- */

static struct mps_segment *segment_new(void *base, uint64_t length)
{
    struct mps_segment *segment = malloc(sizeof(*segment));
    if (!segment)
        return NULL;
    segment->base = base;
    segment->length = length;
    segment->refs = 1;
    return segment;
}

int mps_segment_create(const char *name, uint64_t size, uint64_t reserve, struct mps_segment **segment_out)
{
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0)
        return errno;
    int err = 0;
    if (ftruncate(fd, (off_t)size) != 0)
        err = errno;
    /* Reserve these pages now: a full /dev/shm fails here with ENOSPC instead of a SIGBUS on
     * first touch, possibly in another process, much later. */
    if (!err && reserve)
        err = posix_fallocate(fd, 0, (off_t)reserve);
    void *base = MAP_FAILED;
    if (!err) {
        base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED)
            err = errno;
    }
    close(fd);
    struct mps_segment *segment = err ? NULL : segment_new(base, size);
    if (!err && !segment) {
        munmap(base, size);
        err = ENOMEM;
    }
    if (err) {
        shm_unlink(name);
        return err;
    }
    *segment_out = segment;
    return 0;
}

int mps_segment_open(const char *name, struct mps_segment **segment_out)
{
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0)
        return errno;
    struct stat st;
    int err = fstat(fd, &st) == 0 ? 0 : errno;
    void *base = MAP_FAILED;
    if (!err && st.st_size < MPS_RING_DATA_OFFSET)
        err = EINVAL;
    if (!err) {
        base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED)
            err = errno;
    }
    close(fd);
    struct mps_segment *segment = err ? NULL : segment_new(base, (uint64_t)st.st_size);
    if (!err && !segment) {
        munmap(base, (size_t)st.st_size);
        err = ENOMEM;
    }
    if (err)
        return err;
    *segment_out = segment;
    return 0;
}

static void segment_retain(struct mps_segment *segment)
{
    __atomic_add_fetch(&segment->refs, 1, __ATOMIC_RELAXED);
}

void mps_segment_release(struct mps_segment *segment)
{
    if (segment && __atomic_sub_fetch(&segment->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        munmap(segment->base, segment->length);
        free(segment);
    }
}

int mps_segment_unlink(const char *name)
{
    return shm_unlink(name) == 0 ? 0 : errno;
}

uint64_t mps_ring_segment_length(uint64_t capacity)
{
    return MPS_RING_DATA_OFFSET + capacity;
}

/* Half the capacity less the control reserve: a record of that size fits after at most one
 * padding record from any position of an empty ring, so a legal claim always succeeds eventually. */
uint64_t mps_ring_max_payload_length(uint64_t capacity)
{
    uint64_t max = (capacity - MPS_RING_CONTROL_RESERVE) / 2 - MPS_RECORD_HEADER_LENGTH;
    return max > UINT32_MAX ? UINT32_MAX : max;
}

/* ---- ring setup --------------------------------------------------------------------------- */

int mps_ring_init(void *base, uint64_t capacity, uint64_t max_records, uint64_t start_position)
{
    if (capacity < MPS_RING_MIN_CAPACITY || (capacity & (capacity - 1)) != 0 ||
        start_position % MPS_RECORD_ALIGNMENT != 0)
        return EINVAL;
    struct mps_ring_shared *shared = base;
    memset(shared, 0, sizeof(*shared));
    shared->descriptor.layout_version = MPS_RING_LAYOUT_VERSION;
    shared->descriptor.capacity = capacity;
    shared->descriptor.max_records = max_records;
    shared->descriptor.creator_pid = getpid();
    atomic_store(&shared->tail_position, start_position);
    atomic_store(&shared->head_position, start_position);
    /* The magic goes last: a reader that sees it sees a complete descriptor. */
    atomic_thread_fence(memory_order_seq_cst);
    atomic_store((_Atomic uint64_t *)&shared->descriptor.magic, MPS_RING_MAGIC);
    return 0;
}

int mps_ring_attach(struct mps_segment *segment, int side, uint32_t spin_ns, uint64_t nap_ns,
                    struct mps_ring **ring_out)
{
    void *base = segment->base;
    struct mps_ring_shared *shared = base;
    if (atomic_load((_Atomic uint64_t *)&shared->descriptor.magic) != MPS_RING_MAGIC)
        return MPS_ATTACH_BAD_MAGIC;
    if (shared->descriptor.layout_version != MPS_RING_LAYOUT_VERSION)
        return MPS_ATTACH_BAD_VERSION;
    uint64_t capacity = shared->descriptor.capacity;
    if (capacity < MPS_RING_MIN_CAPACITY || (capacity & (capacity - 1)) != 0 ||
        mps_ring_segment_length(capacity) != segment->length)
        return MPS_ATTACH_BAD_CAPACITY;

    struct mps_ring *ring = calloc(1, sizeof(*ring));
    if (!ring)
        return MPS_ATTACH_NO_MEMORY;
    ring->segment = segment;
    ring->shared = shared;
    ring->data = (uint8_t *)base + MPS_RING_DATA_OFFSET;
    ring->capacity = capacity;
    ring->mask = capacity - 1;
    ring->max_records = shared->descriptor.max_records;
    ring->side = side;
    ring->spin_ns = spin_ns;
    ring->nap_ns = nap_ns ? (int64_t)nap_ns : MPS_RING_NAP_NS;
    ring->peer_pidfd = -1;

    /* A side's pid stays in its slot after detach, so the peer can still tell a dead writer
     * from a slow one; the slot can be taken over from this process or from a dead one. */
    _Atomic int32_t *slot = side == MPS_RING_PRODUCER ? &shared->producer_pid : &shared->consumer_pid;
    int32_t self = (int32_t)getpid();
    int32_t current = atomic_load(slot);
    do {
        if (current != 0 && current != self && (kill(current, 0) == 0 || errno == EPERM)) {
            free(ring);
            return MPS_ATTACH_SIDE_TAKEN;
        }
    } while (!atomic_compare_exchange_weak(slot, &current, self));
    if (side == MPS_RING_CONSUMER)
        atomic_store(&shared->consumer_closed, 0);
    if (side == MPS_RING_PRODUCER) {
        ring->tail_position = atomic_load(&shared->tail_position);
        ring->records_committed = atomic_load(&shared->records_committed);
        ring->cached_head_position = atomic_load(&shared->head_position);
        ring->cached_records_released = atomic_load(&shared->records_released);
    } else {
        ring->head_position = atomic_load(&shared->head_position);
        ring->records_released = atomic_load(&shared->records_released);
        ring->cached_tail_position = atomic_load(&shared->tail_position);
    }
    segment_retain(segment);
    *ring_out = ring;
    return MPS_ATTACH_OK;
}

static void consumer_publish(struct mps_ring *ring)
{
    struct mps_ring_shared *shared = ring->shared;
    atomic_store_explicit(&shared->records_released, ring->records_released, memory_order_relaxed);
    atomic_store_explicit(&shared->head_position, ring->head_position, memory_order_release);
    wake_if_waiting(&shared->producer_waiting, &shared->space_futex);
}

void mps_ring_free(struct mps_ring *ring)
{
    if (!ring)
        return;
    struct mps_ring_shared *shared = ring->shared;
    if (ring->side == MPS_RING_CONSUMER) {
        atomic_store(&shared->consumer_closed, 1);
        wake_if_waiting(&shared->producer_waiting, &shared->space_futex);
    }
    if (ring->peer_pidfd >= 0)
        close(ring->peer_pidfd);
    mps_segment_release(ring->segment);
    free(ring);
}

/* ---- waiting ------------------------------------------------------------------------------ */

typedef int (*mps_poll_fn)(void *context);

/* Where a side sleeps: its own "waiting" flag and the futex word the other side bumps. */
static _Atomic uint32_t *waiting_flag(struct mps_ring *ring)
{
    return ring->side == MPS_RING_PRODUCER ? &ring->shared->producer_waiting : &ring->shared->consumer_waiting;
}

static _Atomic uint32_t *wake_word(struct mps_ring *ring)
{
    return ring->side == MPS_RING_PRODUCER ? &ring->shared->space_futex : &ring->shared->data_futex;
}

static void set_waiting(struct mps_ring **rings, uint32_t count, uint32_t value)
{
    for (uint32_t i = 0; i < count; i++)
        atomic_store(waiting_flag(rings[i]), value); /* seq_cst: ordered before the re-check */
}

/* An optional extra futex word to wake on: it rang once it differs from seen. */
struct doorbell {
    _Atomic uint32_t *word;
    uint32_t seen;
};

static const struct doorbell NO_DOORBELL = {.word = NULL, .seen = 0};

static bool rang(const struct doorbell *bell)
{
    return bell->word && atomic_load_explicit(bell->word, memory_order_acquire) != bell->seen;
}

void mps_doorbell_ring(uint32_t *doorbell)
{
    _Atomic uint32_t *word = (_Atomic uint32_t *)doorbell;
    atomic_fetch_add(word, 1); /* seq_cst: a message the ringer sent before is visible first */
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

uint64_t mps_counter_next(uint64_t *word)
{
    return __atomic_fetch_add(word, 1, __ATOMIC_ACQ_REL);
}

/* Sleeps until a futex word of the set (or the doorbell) changes, the (absolute, monotonic)
 * deadline, or a signal. One futex_waitv call covers any number of rings (Linux >= 5.16). */
static int park(struct mps_ring **rings, uint32_t count, const uint32_t *seen, const struct doorbell *bell,
                int64_t deadline_ns)
{
    struct futex_waitv waiters[MPS_RING_MAX_WAIT_SET];
    for (uint32_t i = 0; i < count; i++) {
        waiters[i] = (struct futex_waitv){.val = seen[i], .uaddr = (uintptr_t)wake_word(rings[i]),
                                          .flags = FUTEX_32}; /* shared: no FUTEX_PRIVATE_FLAG */
    }
    uint32_t n = count;
    if (bell->word)
        waiters[n++] = (struct futex_waitv){.val = bell->seen, .uaddr = (uintptr_t)bell->word, .flags = FUTEX_32};
    struct timespec ts = {.tv_sec = deadline_ns / 1000000000LL, .tv_nsec = deadline_ns % 1000000000LL};
    if (syscall(SYS_futex_waitv, waiters, n, 0, &ts, CLOCK_MONOTONIC) >= 0)
        return 0;
    return errno;
}

/* Spin up to the first ring's spin_ns, then park on every ring's futex (and the doorbell) in
 * naps of the first ring's nap_ns until poll() stops returning not_ready, the doorbell rings,
 * the timeout passes, a signal arrives, or a peer dies (*dead_index). */
static int wait_for(struct mps_ring **rings, uint32_t count, mps_poll_fn poll_once, void *context,
                    int not_ready, int64_t timeout_ns, const struct doorbell *bell, uint32_t *dead_index,
                    int64_t *clock)
{
    int result = poll_once(context);
    if (result != not_ready)
        return result;
    if (rang(bell))
        return MPS_RING_RUNG;
    int64_t start = mps_clock_switch(clock, not_ready == MPS_RING_FULL ? MPS_WAIT_CREDIT : MPS_WAIT_INPUT);
    int64_t spin_ns = rings[0]->spin_ns;
    if (timeout_ns >= 0 && timeout_ns < spin_ns)
        spin_ns = timeout_ns;
    /* Spin first (up to the timeout): a peer in the middle of a record answers faster than a
     * futex wake. Bounded by time, not count: PAUSE costs 10x more on some CPUs than others.
     * After the first microsecond, yield now and then: the scheduler often queues the peer we
     * just woke on our own CPU, where a plain spin would keep it from running until we park.
     * A reader yields at once: the writer it waits on is often the peer it just woke (a
     * request's answer; on a 2-CPU VM both mostly run on one CPU). That first yield took about
     * 1.5 us off bench/transport.py's parked one-way latency (README: "Performance"); a writer
     * waiting for space does not yield at once: its reader has records to work on already. */
    if (spin_ns && not_ready == MPS_RING_EMPTY)
        sched_yield();
    for (uint32_t i = 1; spin_ns; i++) {
        cpu_relax();
        result = poll_once(context);
        if (result != not_ready)
            goto done;
        if (rang(bell)) {
            result = MPS_RING_RUNG;
            goto done;
        }
        if (i % 16 == 0) {
            int64_t spun = now_ns() - start;
            if (spun >= spin_ns)
                break;
            if (i % 64 == 0 && spun >= MPS_RING_YIELD_AFTER_NS)
                sched_yield();
        }
    }
    uint32_t seen[MPS_RING_MAX_WAIT_SET];
    for (;;) {
        for (uint32_t i = 0; i < count; i++)
            seen[i] = atomic_load(wake_word(rings[i]));
        set_waiting(rings, count, 1);
        result = poll_once(context);
        if (result != not_ready) {
            set_waiting(rings, count, 0);
            goto done;
        }
        int64_t now = now_ns();
        int64_t deadline = now + rings[0]->nap_ns;
        if (timeout_ns >= 0 && start + timeout_ns < deadline)
            deadline = start + timeout_ns;
        if (deadline <= now) {
            set_waiting(rings, count, 0);
            result = MPS_RING_TIMEOUT;
            goto done;
        }
        int err = park(rings, count, seen, bell, deadline);
        set_waiting(rings, count, 0);
        result = poll_once(context);
        if (result != not_ready)
            goto done;
        if (rang(bell)) {
            result = MPS_RING_RUNG;
            goto done;
        }
        if (err == EINTR) {
            result = MPS_RING_INTERRUPTED;
            goto done;
        }
        for (uint32_t i = 0; i < count; i++) {
            if (peer_is_dead(rings[i])) {
                *dead_index = i;
                result = MPS_RING_PEER_DEAD;
                goto done;
            }
        }
    }
done:;
    uint64_t waited = (uint64_t)(mps_clock_switch(clock, 0) - start);
    for (uint32_t i = 0; i < count; i++) {
        rings[i]->waits++;
        rings[i]->wait_ns += waited;
    }
    return result;
}

/* ---- producer ----------------------------------------------------------------------------- */

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; mpstream needs 5.16 (futex_waitv) anyway */
#endif

/* Reserves and maps the data region up to byte need (a prefix, grown by at least
 * MPS_RING_POPULATE_CHUNK) before the producer first writes there: one system call instead of
 * a page fault per page, and a full /dev/shm is MPS_RING_NO_SPACE instead of a SIGBUS at a
 * store. The range starts on a page boundary: with pages above 4 KiB the first data bytes share
 * a page with the descriptor. */
static int producer_populate(struct mps_ring *ring, uint64_t need)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t end = ring->populated + MPS_RING_POPULATE_CHUNK;
    end = need > end ? need : end;
    end = end < ring->capacity ? end : ring->capacity;
    uintptr_t from = (uintptr_t)(ring->data + ring->populated) & ~(uintptr_t)(page - 1);
    uintptr_t to = align_up((uintptr_t)(ring->data + end), page);
    if (madvise((void *)from, to - from, MADV_POPULATE_WRITE) != 0)
        return MPS_RING_NO_SPACE;
    ring->populated = end;
    return MPS_RING_OK;
}

static inline uint64_t claim_bytes(struct mps_ring *ring, uint64_t record_length, uint64_t *padding)
{
    uint64_t to_end = ring->capacity - (ring->tail_position & ring->mask);
    *padding = record_length > to_end ? to_end : 0;
    return *padding + record_length;
}

static int producer_poll(void *context)
{
    struct mps_ring *ring = context;
    uint64_t padding;
    bool control = ring->claim_type != MPS_RECORD_DATA && ring->claim_type != MPS_RECORD_SCHEMA;
    uint64_t needed = claim_bytes(ring, ring->claim_length, &padding) + (control ? 0 : MPS_RING_CONTROL_RESERVE);
    struct mps_ring_shared *shared = ring->shared;
    bool has_space = ring->tail_position + needed - ring->cached_head_position <= ring->capacity;
    bool has_credit = ring->max_records == 0 ||
                      ring->records_committed - ring->cached_records_released < ring->max_records;
    if (has_space && has_credit)
        return MPS_RING_OK;
    ring->cached_head_position = atomic_load_explicit(&shared->head_position, memory_order_acquire);
    ring->cached_records_released = atomic_load_explicit(&shared->records_released, memory_order_relaxed);
    if (atomic_load_explicit(&shared->consumer_closed, memory_order_relaxed))
        return MPS_RING_CLOSED;
    has_space = ring->tail_position + needed - ring->cached_head_position <= ring->capacity;
    has_credit = ring->max_records == 0 ||
                 ring->records_committed - ring->cached_records_released < ring->max_records;
    return has_space && has_credit ? MPS_RING_OK : MPS_RING_FULL;
}

static int begin_claim(struct mps_ring *ring, uint32_t type, uint32_t length)
{
    if (ring->side != MPS_RING_PRODUCER || ring->claim_length != 0)
        return MPS_RING_BAD_STATE;
    if (length > mps_ring_max_payload_length(ring->capacity))
        return MPS_RING_TOO_LARGE;
    ring->claim_type = type;
    ring->claim_payload = length;
    ring->claim_length = align_up(MPS_RECORD_HEADER_LENGTH + (uint64_t)length, MPS_RECORD_ALIGNMENT);
    return MPS_RING_OK;
}

static int end_claim(struct mps_ring *ring, int result, uint64_t *offset_out)
{
    if (result != MPS_RING_OK) {
        ring->claim_length = 0;
        return result;
    }
    claim_bytes(ring, ring->claim_length, &ring->claim_padding);
    uint64_t need = ring->claim_padding ? ring->capacity : (ring->tail_position & ring->mask) + ring->claim_length;
    if (need > ring->populated && producer_populate(ring, need) != MPS_RING_OK) {
        ring->claim_length = 0;
        return MPS_RING_NO_SPACE;
    }
    uint64_t index = (ring->tail_position + ring->claim_padding) & ring->mask;
    *offset_out = index + MPS_RECORD_HEADER_LENGTH;
    return MPS_RING_OK;
}

int mps_ring_try_claim(struct mps_ring *ring, uint32_t type, uint32_t length, uint64_t *offset_out)
{
    int result = begin_claim(ring, type, length);
    if (result != MPS_RING_OK)
        return result;
    return end_claim(ring, producer_poll(ring), offset_out);
}

int mps_ring_claim(struct mps_ring *ring, uint32_t type, uint32_t length, int64_t timeout_ns,
                   uint64_t *offset_out, int64_t *clock)
{
    int result = begin_claim(ring, type, length);
    if (result != MPS_RING_OK)
        return result;
    uint32_t dead_index;
    result = wait_for(&ring, 1, producer_poll, ring, MPS_RING_FULL, timeout_ns, &NO_DOORBELL, &dead_index,
                      clock);
    return end_claim(ring, result, offset_out);
}

int mps_ring_commit(struct mps_ring *ring)
{
    return mps_ring_commit_with(ring, NULL, 0);
}

int mps_ring_commit_with(struct mps_ring *ring, const char *prefix, uint32_t prefix_length)
{
    if (ring->side != MPS_RING_PRODUCER || ring->claim_length == 0 || prefix_length > ring->claim_payload)
        return MPS_RING_BAD_STATE;
    struct mps_ring_shared *shared = ring->shared;
    if (ring->claim_padding) {
        struct mps_record_header *pad = (void *)(ring->data + (ring->tail_position & ring->mask));
        pad->length = (uint32_t)(ring->claim_padding - MPS_RECORD_HEADER_LENGTH);
        pad->type = MPS_RECORD_PADDING;
    }
    uint64_t record_position = ring->tail_position + ring->claim_padding;
    struct mps_record_header *header = (void *)(ring->data + (record_position & ring->mask));
    if (prefix_length)
        memcpy((uint8_t *)header + MPS_RECORD_HEADER_LENGTH, prefix, prefix_length);
    header->length = ring->claim_payload;
    header->type = ring->claim_type;
    ring->tail_position = record_position + ring->claim_length;
    ring->records_committed++;
    ring->claim_length = 0;
    atomic_store_explicit(&shared->records_committed, ring->records_committed, memory_order_relaxed);
    atomic_store_explicit(&shared->tail_position, ring->tail_position, memory_order_release);
    wake_if_waiting(&shared->consumer_waiting, &shared->data_futex);
    return MPS_RING_OK;
}

int mps_ring_abort(struct mps_ring *ring)
{
    if (ring->side != MPS_RING_PRODUCER || ring->claim_length == 0)
        return MPS_RING_BAD_STATE;
    ring->claim_length = 0;
    return MPS_RING_OK;
}

/* ---- consumer ----------------------------------------------------------------------------- */

/* Skips padding; OK when a record is at head_position, else EMPTY. */
static int consumer_poll(struct mps_ring *ring)
{
    for (;;) {
        if (ring->head_position == ring->cached_tail_position) {
            ring->cached_tail_position =
                atomic_load_explicit(&ring->shared->tail_position, memory_order_acquire);
            if (ring->head_position == ring->cached_tail_position)
                return MPS_RING_EMPTY;
        }
        struct mps_record_header *header = (void *)(ring->data + (ring->head_position & ring->mask));
        if (header->type != MPS_RECORD_PADDING)
            return MPS_RING_OK;
        ring->head_position += MPS_RECORD_HEADER_LENGTH + header->length;
    }
}

/* Describes the committed record at position in *record; returns its length in the ring. */
static uint64_t read_record(struct mps_ring *ring, uint64_t position, struct mps_record *record)
{
    uint64_t index = position & ring->mask;
    struct mps_record_header *header = (void *)(ring->data + index);
    record->type = header->type;
    record->length = header->length;
    record->offset = index + MPS_RECORD_HEADER_LENGTH;
    return align_up(MPS_RECORD_HEADER_LENGTH + (uint64_t)header->length, MPS_RECORD_ALIGNMENT);
}

static int fill_record(struct mps_ring *ring, int result, struct mps_record *record)
{
    if (result != MPS_RING_OK)
        return result;
    ring->peek_length = read_record(ring, ring->head_position, record);
    return MPS_RING_OK;
}

struct consumer_set {
    struct mps_ring **rings;
    uint32_t count;
    uint32_t next; /* where the round-robin poll starts; the ready ring's index on OK */
};

/* Polls the rings round-robin from next, so one busy input cannot starve the others. */
static int consumer_set_poll(void *context)
{
    struct consumer_set *set = context;
    for (uint32_t k = 0; k < set->count; k++) {
        uint32_t i = (set->next + k) % set->count;
        if (consumer_poll(set->rings[i]) == MPS_RING_OK) {
            set->next = i;
            return MPS_RING_OK;
        }
    }
    return MPS_RING_EMPTY;
}

static int peek_any(struct mps_ring **rings, uint32_t count, uint32_t *index, int64_t timeout_ns,
                    struct mps_record *record, const struct doorbell *bell, int64_t *clock)
{
    if (count == 0 || count + (bell->word != NULL) > MPS_RING_MAX_WAIT_SET)
        return MPS_RING_BAD_STATE;
    for (uint32_t i = 0; i < count; i++) {
        if (rings[i]->side != MPS_RING_CONSUMER || rings[i]->peek_length != 0)
            return MPS_RING_BAD_STATE;
    }
    struct consumer_set set = {.rings = rings, .count = count, .next = *index % count};
    uint32_t dead_index = 0;
    int result = timeout_ns == 0 ? consumer_set_poll(&set)
                                 : wait_for(rings, count, consumer_set_poll, &set, MPS_RING_EMPTY,
                                            timeout_ns, bell, &dead_index, clock);
    *index = result == MPS_RING_PEER_DEAD ? dead_index : set.next;
    return result == MPS_RING_OK ? fill_record(rings[set.next], result, record) : result;
}

int mps_ring_peek_any(struct mps_ring **rings, uint32_t count, uint32_t *index, int64_t timeout_ns,
                      struct mps_record *record, int64_t *clock)
{
    return peek_any(rings, count, index, timeout_ns, record, &NO_DOORBELL, clock);
}

int mps_ring_peek_any_or(struct mps_ring **rings, uint32_t count, uint32_t *index, int64_t timeout_ns,
                         struct mps_record *record, uint32_t *doorbell, uint32_t seen, int64_t *clock)
{
    struct doorbell bell = {.word = (_Atomic uint32_t *)doorbell, .seen = seen};
    return peek_any(rings, count, index, timeout_ns, record, &bell, clock);
}

int mps_ring_try_peek(struct mps_ring *ring, struct mps_record *record)
{
    uint32_t index = 0;
    return mps_ring_peek_any(&ring, 1, &index, 0, record, NULL);
}

int mps_ring_peek(struct mps_ring *ring, int64_t timeout_ns, struct mps_record *record, int64_t *clock)
{
    uint32_t index = 0;
    return mps_ring_peek_any(&ring, 1, &index, timeout_ns < 0 ? -1 : timeout_ns == 0 ? 1 : timeout_ns, record,
                             clock);
}

int mps_ring_release(struct mps_ring *ring)
{
    if (ring->side != MPS_RING_CONSUMER || ring->peek_length == 0)
        return MPS_RING_BAD_STATE;
    ring->head_position += ring->peek_length;
    ring->records_released++;
    ring->peek_length = 0;
    /* Publish on every release: a consumer that kept its head private could go off to wait on
     * another input while this producer sleeps for space already freed (a deadlock). The
     * store is cheap; the producer reads the line only when its cached head runs out. */
    consumer_publish(ring);
    return MPS_RING_OK;
}

uint64_t mps_ring_head(struct mps_ring *ring)
{
    return ring->head_position;
}

int mps_ring_scan(struct mps_ring *ring, uint64_t *position, struct mps_record *record)
{
    if (ring->side != MPS_RING_CONSUMER || *position < ring->head_position)
        return MPS_RING_BAD_STATE;
    uint64_t tail = atomic_load_explicit(&ring->shared->tail_position, memory_order_acquire);
    while (*position < tail) {
        uint64_t length = read_record(ring, *position, record);
        if (record->type == MPS_RECORD_PADDING) {
            *position += MPS_RECORD_HEADER_LENGTH + record->length; /* up to the end: not aligned */
            continue;
        }
        *position += length;
        return MPS_RING_OK;
    }
    return MPS_RING_EMPTY;
}

/* ---- introspection ------------------------------------------------------------------------ */

uint8_t *mps_ring_data(struct mps_ring *ring)
{
    return ring->data;
}

void mps_ring_get_stats(struct mps_ring *ring, struct mps_ring_stats *stats)
{
    bool producer = ring->side == MPS_RING_PRODUCER;
    stats->tail_position = producer ? ring->tail_position : atomic_load(&ring->shared->tail_position);
    stats->head_position = producer ? atomic_load(&ring->shared->head_position) : ring->head_position;
    stats->records = producer ? ring->records_committed : ring->records_released;
    stats->waits = ring->waits;
    stats->wait_ns = ring->wait_ns;
}
