/* mps_kernels: see mps_kernels.h. */
#include "mps_kernels.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

void mps_hash_int64(const int64_t *keys, uint64_t n, uint64_t *out)
{
    for (uint64_t i = 0; i < n; i++)
        out[i] = mix64((uint64_t)keys[i]);
}

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

static inline uint64_t load32(const uint8_t *p)
{
    uint32_t w;
    memcpy(&w, p, 4);
    return w;
}

/* The 128-bit product of a and b, its halves xored: wyhash's mixing step. */
static inline uint64_t fold_multiply(uint64_t a, uint64_t b)
{
    unsigned __int128 r = (unsigned __int128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static const uint64_t WY0 = 0x2d358dccaa6c78a5ULL, WY1 = 0x8bb84b93962eacc9ULL;

void mps_hash_utf8(const int64_t *offsets, const uint8_t *data, uint64_t n, uint64_t *out)
{
    const uint64_t seed0 = fold_multiply(WY0, WY1);
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *p = data + offsets[i];
        uint64_t len = (uint64_t)(offsets[i + 1] - offsets[i]), seed = seed0, a, b;
        if (len <= 16) {
            if (len >= 4) {
                uint64_t step = (len >> 3) << 2;
                a = (load32(p) << 32) | load32(p + step);
                b = (load32(p + len - 4) << 32) | load32(p + len - 4 - step);
            } else if (len > 0) {
                a = ((uint64_t)p[0] << 16) | ((uint64_t)p[len >> 1] << 8) | p[len - 1];
                b = 0;
            } else {
                a = b = 0;
            }
        } else {
            uint64_t left = len;
            for (; left > 16; left -= 16, p += 16)
                seed = fold_multiply(load64(p) ^ WY1, load64(p + 8) ^ seed);
            a = load64(p + left - 16);
            b = load64(p + left - 8);
        }
        unsigned __int128 r = (unsigned __int128)(a ^ WY1) * (b ^ seed);
        out[i] = fold_multiply((uint64_t)r ^ WY0 ^ len, (uint64_t)(r >> 64) ^ WY1);
    }
}

int mps_hashes_to_instances(const uint64_t *hashes, uint64_t n, uint32_t groups, uint32_t instances,
                            uint64_t salt, uint64_t row, int64_t *out)
{
    if (groups == 0 || groups > MPS_MAX_KEY_GROUPS || instances == 0 || instances > groups)
        return -1;
    int64_t owner[MPS_MAX_KEY_GROUPS]; /* group -> instance: no division per row */
    for (uint32_t g = 0; g < groups; g++)
        owner[g] = (int64_t)((uint64_t)g * instances / groups);
    if (salt < 2) {
        for (uint64_t i = 0; i < n; i++)
            out[i] = owner[((unsigned __int128)hashes[i] * groups) >> 64];
        return 0;
    }
    uint64_t step = row % salt;      /* (row + i) mod salt */
    uint64_t shift = step % instances; /* the same, mod instances */
    for (uint64_t i = 0; i < n; i++) {
        int64_t to = owner[((unsigned __int128)hashes[i] * groups) >> 64] + (int64_t)shift;
        out[i] = to >= (int64_t)instances ? to - (int64_t)instances : to;
        if (++step == salt)
            step = shift = 0;
        else if (++shift == instances)
            shift = 0;
    }
    return 0;
}

int mps_partition_order(const int64_t *partition, uint64_t n, uint32_t partitions, int64_t *order,
                        int64_t *counts)
{
    /* Counted in four lanes, so rows of one partition in a row do not each wait on the last
     * one's increment; the pointers are restrict, so no store makes the compiler load a
     * cursor or an id again. */
    uint64_t width = partitions ? partitions : 1;
    int64_t *restrict lanes = calloc(4 * width, sizeof(int64_t));
    if (!lanes)
        return -1;
    const int64_t *restrict ids = partition;
    uint64_t i = 0;
    for (; i < n; i++) {
        uint64_t id = (uint64_t)ids[i];
        if (id >= partitions) {
            free(lanes);
            return -1;
        }
        lanes[(i & 3) * width + id]++;
    }
    int64_t start = 0;
    for (uint32_t p = 0; p < partitions; p++) { /* the first lane becomes the cursors */
        counts[p] = lanes[p] + lanes[width + p] + lanes[2 * width + p] + lanes[3 * width + p];
        lanes[p] = start;
        start += counts[p];
    }
    int64_t *restrict out = order;
    for (i = 0; i < n; i++)
        out[lanes[ids[i]]++] = (int64_t)i;
    free(lanes);
    return 0;
}

void mps_take_utf8(const int64_t *offsets, const uint8_t *data, const int64_t *indices, uint64_t n,
                   int64_t *out_offsets, uint8_t *out_data)
{
    int64_t position = 0;
    out_offsets[0] = 0;
    for (uint64_t i = 0; i < n; i++) {
        int64_t begin = offsets[indices[i]], length = offsets[indices[i] + 1] - begin;
        memcpy(out_data + position, data + begin, (size_t)length);
        position += length;
        out_offsets[i + 1] = position;
    }
}

struct mps_keymap_entry {
    uint64_t key;
    int64_t used; /* slot + 1; 0 when empty, so fresh zeroed memory is an empty table */
};

/* Tables from this size on are mapped on their own, asking for transparent huge pages: a
 * random probe into a large table otherwise misses the TLB too, a costly walk in a VM. */
#define MPS_KEYMAP_HUGE (2u << 20)

/* Recently found keys of the table, by the top bits of their hash: a hot key among many is
 * answered from here, so the prefetched blocks below hold the keys that may miss the cache. */
#define MPS_KEYMAP_RECENT 256

/* The direct front owns keys 0 .. direct_len - 1 while that range stays dense: at most
 * MPS_KEYMAP_DIRECT_PER_KEY entries per key in the map (and at least MPS_KEYMAP_DIRECT_MIN),
 * so small integer keys (ids, codes) are neither hashed nor probed. */
#define MPS_KEYMAP_DIRECT_MIN (1u << 16)
#define MPS_KEYMAP_DIRECT_PER_KEY 8
#define MPS_KEYMAP_MAX_SLOTS (UINT32_MAX - 1) /* slot + 1 fits the front's uint32 */

/* Invariant: the front holds every key below direct_len, the table exactly the others. */
struct mps_keymap {
    struct mps_keymap_entry recent[MPS_KEYMAP_RECENT];
    uint32_t *direct;               /* direct[key] = slot + 1; 0: not in the map */
    uint64_t direct_len;
    struct mps_keymap_entry *table; /* capacity entries: key and slot side by side */
    uint64_t capacity;              /* a power of two */
    uint64_t table_size;            /* keys in the table */
    uint64_t *slot_keys;            /* size entries, grown by doubling */
    uint64_t size;
    uint64_t slot_capacity;
    int64_t reserved;               /* the slot no key maps to (mps_keymap_reserve), or -1 */
};

/* Slot s holds a key (every slot but the reserved one). */
static inline bool keymap_keyed(const struct mps_keymap *map, uint64_t s)
{
    return (int64_t)s != map->reserved;
}

static struct mps_keymap_entry *table_alloc(uint64_t capacity)
{
    size_t bytes = sizeof(struct mps_keymap_entry) * capacity;
    if (bytes < MPS_KEYMAP_HUGE)
        return calloc(capacity, sizeof(struct mps_keymap_entry));
    void *table = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (table == MAP_FAILED)
        return NULL;
    madvise(table, bytes, MADV_HUGEPAGE); /* advice: without THP it is a no-op */
    return table;
}

static void table_release(struct mps_keymap_entry *table, uint64_t capacity)
{
    size_t bytes = sizeof(struct mps_keymap_entry) * capacity;
    if (bytes < MPS_KEYMAP_HUGE)
        free(table);
    else if (table)
        munmap(table, bytes);
}

static void keymap_place(struct mps_keymap *map, uint64_t key, int64_t slot)
{
    uint64_t mask = map->capacity - 1;
    for (uint64_t i = mix64(key) & mask;; i = (i + 1) & mask) {
        if (!map->table[i].used) {
            map->table[i].key = key;
            map->table[i].used = slot + 1;
            map->table_size++;
            return;
        }
    }
}

/* Refills a table of capacity entries with every key the front does not own. */
static int keymap_rebuild(struct mps_keymap *map, uint64_t capacity)
{
    if (capacity == map->capacity) {
        memset(map->table, 0, sizeof(struct mps_keymap_entry) * capacity);
    } else {
        struct mps_keymap_entry *table = table_alloc(capacity);
        if (!table)
            return -1;
        table_release(map->table, map->capacity);
        map->table = table;
        map->capacity = capacity;
    }
    map->table_size = 0;
    for (uint64_t s = 0; s < map->size; s++) {
        if (keymap_keyed(map, s) && map->slot_keys[s] >= map->direct_len)
            keymap_place(map, map->slot_keys[s], (int64_t)s);
    }
    return 0;
}

struct mps_keymap *mps_keymap_new(uint64_t expected_keys)
{
    struct mps_keymap *map = calloc(1, sizeof(*map));
    uint64_t capacity = 16;
    while (capacity < 2 * expected_keys)
        capacity *= 2;
    if (map)
        map->table = table_alloc(capacity);
    if (!map || !map->table) {
        free(map);
        return NULL;
    }
    map->capacity = capacity;
    map->reserved = -1;
    return map;
}

void mps_keymap_free(struct mps_keymap *map)
{
    if (!map)
        return;
    table_release(map->table, map->capacity);
    free(map->slot_keys);
    free(map->direct);
    free(map);
}

void mps_keymap_clear(struct mps_keymap *map)
{
    bool sparse_table = map->table_size * 16 < map->capacity;
    bool sparse_front = map->size * 16 < map->direct_len;
    for (uint64_t s = 0; s < map->size && (sparse_table || sparse_front); s++) {
        if (!keymap_keyed(map, s))
            continue;
        uint64_t key = map->slot_keys[s], mask = map->capacity - 1, i = mix64(key) & mask;
        if (key < map->direct_len) {
            map->direct[key] = 0;
            continue;
        }
        if (!sparse_table)
            continue;
        while (map->table[i].key != key || !map->table[i].used) /* present: see the invariant */
            i = (i + 1) & mask;
        map->table[i].used = 0;
    }
    if (!sparse_table)
        memset(map->table, 0, sizeof(struct mps_keymap_entry) * map->capacity);
    if (!sparse_front && map->direct)
        memset(map->direct, 0, sizeof(uint32_t) * map->direct_len);
    memset(map->recent, 0, sizeof(map->recent));
    map->size = map->table_size = 0;
    map->reserved = -1;
}

/* The next slot, for key; -1 when out of memory or past MPS_KEYMAP_MAX_SLOTS keys. */
static int64_t keymap_append(struct mps_keymap *map, uint64_t key)
{
    if (map->size >= MPS_KEYMAP_MAX_SLOTS)
        return -1;
    if (map->size == map->slot_capacity) {
        uint64_t grown = map->slot_capacity ? map->slot_capacity * 2 : 64;
        uint64_t *more = realloc(map->slot_keys, sizeof(uint64_t) * grown);
        if (!more)
            return -1;
        map->slot_keys = more;
        map->slot_capacity = grown;
    }
    map->slot_keys[map->size] = key;
    return (int64_t)map->size++;
}

/* The slot of a key the front owns, appended if unseen. */
static int64_t keymap_front(struct mps_keymap *map, uint64_t key)
{
    if (map->direct[key])
        return (int64_t)map->direct[key] - 1;
    int64_t slot = keymap_append(map, key);
    if (slot >= 0)
        map->direct[key] = (uint32_t)(slot + 1);
    return slot;
}

/* The slot of a key the table owns (hash is its mix64), inserted if unseen. */
static int64_t keymap_table(struct mps_keymap *map, uint64_t key, uint64_t hash)
{
    uint64_t mask = map->capacity - 1, i = hash & mask;
    while (map->table[i].used) {
        if (map->table[i].key == key)
            return map->table[i].used - 1;
        i = (i + 1) & mask;
    }
    int64_t slot = keymap_append(map, key);
    if (slot < 0)
        return -1;
    map->table[i].key = key;
    map->table[i].used = slot + 1;
    map->table_size++;
    if (2 * map->table_size > map->capacity && keymap_rebuild(map, map->capacity * 2) != 0)
        return -1;
    return slot;
}

/* The front may grow to own keys below this: its range stays dense. */
static inline uint64_t keymap_front_limit(const struct mps_keymap *map)
{
    uint64_t limit = MPS_KEYMAP_DIRECT_PER_KEY * map->size;
    return limit > MPS_KEYMAP_DIRECT_MIN ? limit : MPS_KEYMAP_DIRECT_MIN;
}

/* Widens the front to own key (below keymap_front_limit); the keys it takes leave the table.
 * Returns -1 when out of memory (the map is unchanged). */
static int keymap_cover(struct mps_keymap *map, uint64_t key)
{
    uint64_t len = map->direct_len ? map->direct_len : 1024;
    while (len <= key)
        len *= 2;
    uint32_t *more = realloc(map->direct, sizeof(uint32_t) * len);
    if (!more)
        return -1;
    memset(more + map->direct_len, 0, sizeof(uint32_t) * (len - map->direct_len));
    for (uint64_t s = 0; s < map->size; s++) {
        if (keymap_keyed(map, s) && map->slot_keys[s] >= map->direct_len && map->slot_keys[s] < len)
            more[map->slot_keys[s]] = (uint32_t)(s + 1);
    }
    map->direct = more;
    map->direct_len = len;
    return keymap_rebuild(map, map->capacity);
}

/* Keys of the table go in blocks: hash a block and prefetch its entries, then probe them, so
 * the cache misses of a large table overlap. */
#define MPS_KEYMAP_BLOCK 16

/* Gives the keys waiting in a block their slots, in their order. */
static int keymap_settle(struct mps_keymap *map, const uint64_t *keys, const uint64_t *pending,
                         const uint64_t *hashes, uint64_t waiting, int64_t *slots)
{
    for (uint64_t j = 0; j < waiting; j++) {
        uint64_t key = keys[pending[j]]; /* the front may have taken it since */
        int64_t slot = key < map->direct_len ? keymap_front(map, key) : keymap_table(map, key, hashes[j]);
        if (slot < 0)
            return -1;
        slots[pending[j]] = slot;
        if (key >= map->direct_len)
            map->recent[hashes[j] >> 56] = (struct mps_keymap_entry){key, slot + 1};
    }
    return 0;
}

int64_t mps_keymap_insert(struct mps_keymap *map, const uint64_t *keys, uint64_t n, int64_t *slots)
{
    uint64_t pending[MPS_KEYMAP_BLOCK], hashes[MPS_KEYMAP_BLOCK];
    uint64_t waiting = 0;
    /* The front, held in locals (the stores to slots would otherwise make the compiler load
     * them from the map again for every key); only keymap_cover moves or widens it. */
    const uint32_t *direct = map->direct;
    uint64_t direct_len = map->direct_len;
    for (uint64_t k = 0; k < n; k++) {
        uint64_t key = keys[k];
        if (key < direct_len && direct[key]) { /* the common case: a small key seen before */
            slots[k] = (int64_t)direct[key] - 1;
            continue;
        }
        if (key < direct_len || key < keymap_front_limit(map)) { /* a new key for the front */
            /* the keys waiting before it get their slots first: slots follow first appearance */
            if (keymap_settle(map, keys, pending, hashes, waiting, slots) != 0)
                return -1;
            waiting = 0;
            if (key >= map->direct_len) {
                if (keymap_cover(map, key) != 0)
                    return -1;
                direct = map->direct;
                direct_len = map->direct_len;
            }
            if ((slots[k] = keymap_front(map, key)) < 0)
                return -1;
            continue;
        }
        uint64_t hash = mix64(key);
        const struct mps_keymap_entry *seen = &map->recent[hash >> 56];
        if (seen->key == key && seen->used) {
            slots[k] = seen->used - 1;
            continue;
        }
        pending[waiting] = k;
        hashes[waiting] = hash;
        __builtin_prefetch(&map->table[hash & (map->capacity - 1)]);
        if (++waiting == MPS_KEYMAP_BLOCK) {
            if (keymap_settle(map, keys, pending, hashes, waiting, slots) != 0)
                return -1;
            waiting = 0;
        }
    }
    if (keymap_settle(map, keys, pending, hashes, waiting, slots) != 0)
        return -1;
    return (int64_t)map->size;
}

int64_t mps_keymap_reserve(struct mps_keymap *map)
{
    if (map->reserved < 0)
        map->reserved = keymap_append(map, 0);
    return map->reserved;
}

void mps_keymap_keys(const struct mps_keymap *map, uint64_t first, uint64_t *out, uint64_t capacity)
{
    if (first < map->size) {
        uint64_t n = map->size - first;
        memcpy(out, map->slot_keys + first, sizeof(uint64_t) * (n < capacity ? n : capacity));
    }
}

/* The add kernels sum a run of rows with the same slot in a register and store once per run:
 * a hot key's rows would otherwise wait on each other's store to acc[slot]. */
#define MPS_SCATTER_ADD(linkage, name, type, value, plus)                                      \
    linkage void name(type *acc, const int64_t *slots, const type *values, uint64_t n)       \
    {                                                                                          \
        if (n == 0)                                                                            \
            return;                                                                            \
        int64_t run = slots[0];                                                                \
        type sum = value(0);                                                                   \
        for (uint64_t i = 1; i < n; i++) {                                                     \
            if (slots[i] == run) {                                                             \
                sum = plus(sum, value(i));                                                     \
            } else {                                                                           \
                acc[run] = plus(acc[run], sum);                                                \
                run = slots[i];                                                                \
                sum = value(i);                                                                \
            }                                                                                  \
        }                                                                                      \
        acc[run] = plus(acc[run], sum);                                                        \
    }
#define MPS_ONE(i) ((void)values, 1)
#define MPS_VALUE(i) (values[i])
#define MPS_WRAPPING_PLUS(a, b) ((int64_t)((uint64_t)(a) + (uint64_t)(b))) /* as numpy's int64 */
#define MPS_PLUS(a, b) ((a) + (b))
MPS_SCATTER_ADD(static, scatter_count, int64_t, MPS_ONE, MPS_WRAPPING_PLUS)
MPS_SCATTER_ADD(static, scatter_add_i64, int64_t, MPS_VALUE, MPS_WRAPPING_PLUS)
MPS_SCATTER_ADD(, mps_scatter_add_f64, double, MPS_VALUE, MPS_PLUS)

void mps_scatter_add_i64(int64_t *acc, const int64_t *slots, const int64_t *values, uint64_t n)
{
    if (values) /* two loops: a test of values in the loop costs a count twice its time */
        scatter_add_i64(acc, slots, values, n);
    else
        scatter_count(acc, slots, values, n);
}

/* NaN propagates as in np.minimum / np.maximum: a NaN value or accumulator stays NaN. */
#define MPS_SCATTER_EXTREME(name, type, better)                                               \
    void name(type *acc, const int64_t *slots, const type *values, uint64_t n)               \
    {                                                                                          \
        for (uint64_t i = 0; i < n; i++) {                                                     \
            type a = acc[slots[i]], v = values[i];                                             \
            if (better(v, a) || v != v)                                                        \
                acc[slots[i]] = a != a ? a : v;                                                \
        }                                                                                      \
    }
#define MPS_LESS(v, a) ((v) < (a))
#define MPS_MORE(v, a) ((v) > (a))
MPS_SCATTER_EXTREME(mps_scatter_min_i64, int64_t, MPS_LESS)
MPS_SCATTER_EXTREME(mps_scatter_max_i64, int64_t, MPS_MORE)
MPS_SCATTER_EXTREME(mps_scatter_min_f64, double, MPS_LESS)
MPS_SCATTER_EXTREME(mps_scatter_max_f64, double, MPS_MORE)

int64_t mps_session_groups(const int64_t *slot, const int64_t *start, const int64_t *end, uint64_t n,
                           int64_t *group)
{
    int64_t groups = 0;
    int64_t reach = 0; /* the largest end of the current group */
    for (uint64_t i = 0; i < n; i++) {
        if (i == 0 || slot[i] != slot[i - 1] || start[i] > reach) {
            groups++;
            reach = end[i];
        } else if (end[i] > reach) {
            reach = end[i];
        }
        group[i] = groups - 1;
    }
    return groups;
}



/* ---- UTF-8 <-> UCS4 ---------------------------------------------------------------------- */

static inline int utf8_width(uint32_t c)
{
    return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
}

int64_t mps_utf8_offsets_ucs4(const uint32_t *src, uint64_t n, uint64_t width, int64_t *offsets)
{
    int64_t total = 0;
    offsets[0] = 0;
    for (uint64_t i = 0; i < n; i++) {
        const uint32_t *row = src + i * width;
        uint64_t len = width;
        while (len > 0 && row[len - 1] == 0)
            len--;
        for (uint64_t j = 0; j < len; j++) {
            uint32_t c = row[j];
            if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
                return -1 - (int64_t)i;
            total += utf8_width(c);
        }
        offsets[i + 1] = total;
    }
    return total;
}

void mps_utf8_encode_ucs4(const uint32_t *src, uint64_t n, uint64_t width, const int64_t *offsets, uint8_t *out)
{
    for (uint64_t i = 0; i < n; i++) {
        const uint32_t *row = src + i * width;
        uint8_t *o = out + offsets[i], *end = out + offsets[i + 1];
        for (uint64_t j = 0; o < end; j++) {
            uint32_t c = row[j];
            if (c < 0x80) {
                *o++ = (uint8_t)c;
            } else if (c < 0x800) {
                *o++ = (uint8_t)(0xC0 | (c >> 6));
                *o++ = (uint8_t)(0x80 | (c & 0x3F));
            } else if (c < 0x10000) {
                *o++ = (uint8_t)(0xE0 | (c >> 12));
                *o++ = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
                *o++ = (uint8_t)(0x80 | (c & 0x3F));
            } else {
                *o++ = (uint8_t)(0xF0 | (c >> 18));
                *o++ = (uint8_t)(0x80 | ((c >> 12) & 0x3F));
                *o++ = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
                *o++ = (uint8_t)(0x80 | (c & 0x3F));
            }
        }
    }
}

uint64_t mps_utf8_max_chars(const int64_t *offsets, const uint8_t *data, uint64_t n)
{
    uint64_t best = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t chars = 0;
        for (int64_t k = offsets[i]; k < offsets[i + 1]; k++)
            chars += (data[k] & 0xC0) != 0x80;
        if (chars > best)
            best = chars;
    }
    return best;
}

void mps_utf8_decode_ucs4(const int64_t *offsets, const uint8_t *data, uint64_t n, uint64_t width, uint32_t *out)
{
    for (uint64_t i = 0; i < n; i++) {
        uint32_t *o = out + i * width;
        int64_t k = offsets[i], end = offsets[i + 1];
        while (k < end) {
            uint8_t b = data[k];
            uint32_t c;
            int more;
            if (b < 0x80) {
                c = b;
                more = 0;
            } else if (b < 0xE0) {
                c = b & 0x1F;
                more = 1;
            } else if (b < 0xF0) {
                c = b & 0x0F;
                more = 2;
            } else {
                c = b & 0x07;
                more = 3;
            }
            k++;
            for (; more > 0 && k < end; more--, k++)
                c = (c << 6) | (data[k] & 0x3F);
            *o++ = c;
        }
    }
}
