/* mps_kernels: see mps_kernels.h. */
#include "mps_kernels.h"

#include <stdlib.h>
#include <string.h>

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

void mps_hash_utf8(const int64_t *offsets, const uint8_t *data, uint64_t n, uint64_t *out)
{
    for (uint64_t i = 0; i < n; i++) {
        uint64_t h = 0xcbf29ce484222325ULL;
        for (int64_t j = offsets[i]; j < offsets[i + 1]; j++) {
            h ^= data[j];
            h *= 0x100000001b3ULL;
        }
        out[i] = mix64(h);
    }
}

void mps_hash_to_partition(const uint64_t *hashes, uint64_t n, uint32_t partitions, int64_t *out)
{
    for (uint64_t i = 0; i < n; i++)
        out[i] = (int64_t)(((unsigned __int128)hashes[i] * partitions) >> 64);
}

int mps_partition_order(const int64_t *partition, uint64_t n, uint32_t partitions, int64_t *order,
                        int64_t *counts)
{
    memset(counts, 0, sizeof(int64_t) * partitions);
    for (uint64_t i = 0; i < n; i++) {
        if ((uint64_t)partition[i] >= partitions)
            return -1;
        counts[partition[i]]++;
    }
    int64_t *next = malloc(sizeof(int64_t) * (partitions ? partitions : 1));
    if (!next)
        return -1;
    int64_t start = 0;
    for (uint32_t p = 0; p < partitions; p++) {
        next[p] = start;
        start += counts[p];
    }
    for (uint64_t i = 0; i < n; i++)
        order[next[partition[i]]++] = (int64_t)i;
    free(next);
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

struct mps_keymap {
    uint64_t *table_keys;  /* capacity entries */
    int64_t *table_slots;  /* capacity entries, -1 when empty */
    uint64_t *slot_keys;   /* size entries, grown by doubling */
    uint64_t capacity;     /* a power of two */
    uint64_t size;
    uint64_t slot_capacity;
};

static int keymap_alloc(struct mps_keymap *map, uint64_t capacity)
{
    map->table_keys = malloc(sizeof(uint64_t) * capacity);
    map->table_slots = malloc(sizeof(int64_t) * capacity);
    if (!map->table_keys || !map->table_slots) {
        free(map->table_keys);
        free(map->table_slots);
        return -1;
    }
    memset(map->table_slots, 0xff, sizeof(int64_t) * capacity); /* -1: empty */
    map->capacity = capacity;
    return 0;
}

static void keymap_place(struct mps_keymap *map, uint64_t key, int64_t slot)
{
    uint64_t mask = map->capacity - 1;
    for (uint64_t i = mix64(key) & mask;; i = (i + 1) & mask) {
        if (map->table_slots[i] < 0) {
            map->table_keys[i] = key;
            map->table_slots[i] = slot;
            return;
        }
    }
}

struct mps_keymap *mps_keymap_new(uint64_t expected_keys)
{
    struct mps_keymap *map = calloc(1, sizeof(*map));
    uint64_t capacity = 16;
    while (capacity < 2 * expected_keys)
        capacity *= 2;
    if (!map || keymap_alloc(map, capacity) != 0) {
        free(map);
        return NULL;
    }
    return map;
}

void mps_keymap_free(struct mps_keymap *map)
{
    if (!map)
        return;
    free(map->table_keys);
    free(map->table_slots);
    free(map->slot_keys);
    free(map);
}

static int keymap_grow(struct mps_keymap *map)
{
    struct mps_keymap bigger = *map;
    if (keymap_alloc(&bigger, map->capacity * 2) != 0)
        return -1;
    for (uint64_t s = 0; s < map->size; s++)
        keymap_place(&bigger, map->slot_keys[s], (int64_t)s);
    free(map->table_keys);
    free(map->table_slots);
    map->table_keys = bigger.table_keys;
    map->table_slots = bigger.table_slots;
    map->capacity = bigger.capacity;
    return 0;
}

int64_t mps_keymap_insert(struct mps_keymap *map, const uint64_t *keys, uint64_t n, int64_t *slots)
{
    for (uint64_t k = 0; k < n; k++) {
        uint64_t key = keys[k], mask = map->capacity - 1;
        uint64_t i = mix64(key) & mask;
        while (map->table_slots[i] >= 0 && map->table_keys[i] != key)
            i = (i + 1) & mask;
        if (map->table_slots[i] >= 0) {
            slots[k] = map->table_slots[i];
            continue;
        }
        if (map->size == map->slot_capacity) {
            uint64_t grown = map->slot_capacity ? map->slot_capacity * 2 : 64;
            uint64_t *more = realloc(map->slot_keys, sizeof(uint64_t) * grown);
            if (!more)
                return -1;
            map->slot_keys = more;
            map->slot_capacity = grown;
        }
        int64_t slot = (int64_t)map->size++;
        map->slot_keys[slot] = key;
        map->table_keys[i] = key;
        map->table_slots[i] = slot;
        slots[k] = slot;
        if (2 * map->size > map->capacity && keymap_grow(map) != 0)
            return -1;
    }
    return (int64_t)map->size;
}

void mps_keymap_keys(const struct mps_keymap *map, uint64_t *out)
{
    memcpy(out, map->slot_keys, sizeof(uint64_t) * map->size);
}

void mps_scatter_add_i64(int64_t *acc, const int64_t *slots, const int64_t *values, uint64_t n)
{
    if (!values) {
        for (uint64_t i = 0; i < n; i++)
            acc[slots[i]]++;
        return;
    }
    for (uint64_t i = 0; i < n; i++) /* wraps like numpy's int64 arithmetic */
        acc[slots[i]] = (int64_t)((uint64_t)acc[slots[i]] + (uint64_t)values[i]);
}

void mps_scatter_add_f64(double *acc, const int64_t *slots, const double *values, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        acc[slots[i]] += values[i];
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
