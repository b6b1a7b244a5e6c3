/*
 * mps_kernels: vectorized loops numpy has no single call for, on the shuffle's hot path.
 *
 * Hashes are stable and seedless: the same key hashes the same in every process, run and
 * machine (never Python's per-process salted hash()). All arrays are caller-owned, contiguous,
 * and only read or written during the call.
 */
#ifndef MPS_KERNELS_H
#define MPS_KERNELS_H

#include <stdint.h>

/* out[i] = a 64-bit mix (splitmix64's finalizer) of keys[i]. */
void mps_hash_int64(const int64_t *keys, uint64_t n, uint64_t *out);

/* out[i] = a 64-bit hash of string i (data[offsets[i]:offsets[i+1]]): wyhash's construction (Wang
 * Yi's, public domain: 128-bit multiplies with their halves folded), 16 bytes a step. */
void mps_hash_utf8(const int64_t *offsets, const uint8_t *data, uint64_t n, uint64_t *out);

/* out[i] = the instance (of instances) that owns the key group (of groups, at most
 * MPS_MAX_KEY_GROUPS) of hashes[i]: the group is the hash mapped uniformly onto [0, groups)
 * (multiply-shift, no modulo bias), its owner g * instances / groups (contiguous ranges of
 * groups; with instances == groups, the group itself). With salt > 1, row i (row + i of the
 * stream) goes (row + i) mod salt instances further on, mod instances. One pass; out may be
 * the hashes' own memory. Returns 0, or -1 (nothing written) for arguments out of range. */
#define MPS_MAX_KEY_GROUPS 4096
int mps_hashes_to_instances(const uint64_t *hashes, uint64_t n, uint32_t groups, uint32_t instances,
                            uint64_t salt, uint64_t row, int64_t *out);

/* Stable counting sort of rows by partition id: counts[p] = rows in partition p, and order
 * lists row indices partition by partition, each partition in input order. Returns 0, or -1
 * if an id is outside [0, partitions) (order and counts are then unspecified). */
int mps_partition_order(const int64_t *partition, uint64_t n, uint32_t partitions, int64_t *order,
                        int64_t *counts);

/* Gathers strings indices[0..n) of (offsets, data) into out_offsets (n + 1 entries, from 0)
 * and out_data, which must hold the sum of the gathered lengths. */
void mps_take_utf8(const int64_t *offsets, const uint8_t *data, const int64_t *indices, uint64_t n,
                   int64_t *out_offsets, uint8_t *out_data);

/* UTF-8 from numpy's fixed-width UCS4 strings (dtype U<width>: n rows of width code points,
 * NUL-padded). mps_utf8_offsets_ucs4 writes offsets[0..n] (offsets[0] = 0) and returns the
 * total bytes, or -1 - i when row i holds a code point that is no Unicode scalar value (a
 * surrogate, or above 0x10FFFF). mps_utf8_encode_ucs4 then writes the bytes. */
int64_t mps_utf8_offsets_ucs4(const uint32_t *src, uint64_t n, uint64_t width, int64_t *offsets);
void mps_utf8_encode_ucs4(const uint32_t *src, uint64_t n, uint64_t width, const int64_t *offsets, uint8_t *out);

/* The other way: the longest string of (offsets, data) in code points (UTF-8 lead bytes), and
 * each string decoded into a NUL-padded row of width code points of out (n * width, zeroed by
 * the caller). The bytes must be valid UTF-8 (what every StringColumn holds). */
uint64_t mps_utf8_max_chars(const int64_t *offsets, const uint8_t *data, uint64_t n);
void mps_utf8_decode_ucs4(const int64_t *offsets, const uint8_t *data, uint64_t n, uint64_t width, uint32_t *out);

/* In-place scatter updates of per-slot accumulators: acc[slots[i]] op= values[i]. One pass,
 * O(n) whatever the accumulator's length (bincount is O(length) per call). values NULL in
 * mps_scatter_add_i64 counts (adds 1). Slots must index inside acc. */
void mps_scatter_add_i64(int64_t *acc, const int64_t *slots, const int64_t *values, uint64_t n);
void mps_scatter_add_f64(double *acc, const int64_t *slots, const double *values, uint64_t n);
void mps_scatter_min_i64(int64_t *acc, const int64_t *slots, const int64_t *values, uint64_t n);
void mps_scatter_max_i64(int64_t *acc, const int64_t *slots, const int64_t *values, uint64_t n);
void mps_scatter_min_f64(double *acc, const int64_t *slots, const double *values, uint64_t n);
void mps_scatter_max_f64(double *acc, const int64_t *slots, const double *values, uint64_t n);

/* Session windows: rows sorted by (slot, start) hold intervals [start, end); group[i] = the
 * merged session of row i, numbered from 0 in row order. Rows of one slot whose intervals
 * intersect or touch (start <= the group's largest end so far) share a session; merging is
 * transitive. Returns the number of sessions. */
int64_t mps_session_groups(const int64_t *slot, const int64_t *start, const int64_t *end, uint64_t n,
                           int64_t *group);

/* A map from 64-bit keys to dense slots 0, 1, 2, ... in order of first appearance: the index
 * of keyed state. Small keys (0 up to 8 per key held) live in a direct-address array, the
 * others in a hash table (open addressing, linear probing, grown at half load, probed in
 * prefetched blocks of up to 16 keys; a new small key first settles the block waiting before
 * it, so slots follow first appearance exactly). At most 2^32 - 2 keys. Owned by the caller of
 * mps_keymap_new, freed with mps_keymap_free. */
struct mps_keymap;

struct mps_keymap *mps_keymap_new(uint64_t expected_keys);
void mps_keymap_free(struct mps_keymap *map);
/* Forgets every key (the next insert starts again at slot 0), keeping the memory. */
void mps_keymap_clear(struct mps_keymap *map);
/* slots[i] = the slot of keys[i], inserting unseen keys. Returns the map's size after the
 * call, or -1 when out of memory or keys (the map then holds the keys inserted so far). */
int64_t mps_keymap_insert(struct mps_keymap *map, const uint64_t *keys, uint64_t n, int64_t *slots);
/* The map's one slot that no key maps to (appended at the first call; mpstream gives it to null
 * keys); -1 when out of memory. mps_keymap_clear forgets it. */
int64_t mps_keymap_reserve(struct mps_keymap *map);
/* out[s - first] = the key of slot s, for the slots from first on, at most capacity of them
 * (the reserved slot reads 0). Slots only ever get appended, so a caller keeps the keys it
 * has and asks for the new ones. */
void mps_keymap_keys(const struct mps_keymap *map, uint64_t first, uint64_t *out, uint64_t capacity);

#endif
