/* Attention of single query tokens on CPU over a paged KV cache: a decode row, or one token of a
 * prompt whose keys are already in the cache (causal by construction).
 *
 *     out[i, h] = softmax_j(cap(scale * q[i, h] . K[s_i, j, h / G])) @ V[s_i, j, h / G]
 *
 * cap(x) = softcap * tanh(x / softcap) with a soft cap (softcap > 0: Gemma 2's), else x;
 * over the positions j in [lo_i, len_i) of row i's sequence s_i = row_seq[i]: len_i - 1 is the
 * token's own position, and lo_i is max(0, len_i - window) with a sliding window, else 0. G =
 * heads / kv_heads query heads share a KV head (GQA). The cache is [blocks, block_size,
 * kv_heads, head_dim] float32, contiguous; position j of sequence s lives in block
 * block_tables[s, j / block_size] at offset j % block_size. q and out are [rows, heads,
 * head_dim]. Each row reads only its own positions: no mask, no padding to the longest context.
 * A row goes block by block, every head of a block at once, so each block is read from memory
 * once, and asks for the cache lines of blocks ahead (its own, then the next row's) while it
 * works on this one. Scores go eight keys at a time (independent vector chains, summed by a
 * shuffle tree), the weighted sum of values 64 columns at a time in registers; softmax in
 * float32 with the maximum subtracted and a vector exp. QT consecutive prompt tokens of one
 * sequence (rows of the same sequence whose lengths rise by one) go together as a tile: each
 * key and value vector loaded is used by all QT queries, which halves the loads per
 * multiply-add of the single-row loops (prefill is bound by them, decode by memory). Rows and
 * tiles are shared out over the calling thread's OpenMP team.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention_vec.h"

#define MAX_HEAD_DIM 512
/* A row's blocks sit at unrelated addresses, which the hardware prefetchers cannot guess: while
 * the kernel works on one stretch of the cache it asks for the one PF_DIST stretches further on,
 * far enough ahead to cover memory's latency, and into L2, as that many stretches in flight
 * would crowd out of L1 what the current one still needs. */
#define PF_DIST 2
/* Of a stretch ahead only its first PF_MAX floats are asked for: a large model's block (16
 * positions x 32 KV heads x 128 floats, 256 KB) asked for whole would evict from L2 the one
 * being read. */
#define PF_MAX 4096
#define ROWS_PER_CHUNK 2 /* rows (or tiles) a thread takes at a time */


/* A stretch of the cache that a row reads: n floats from p (one block's positions of the row) */
typedef struct {
    const float *p;
    int64_t n;
} span;

/* Writes to s the stretches of cache c that a row reading positions [lo, len) of the sequence
 * whose block ids are `table` reads, block by block, at most max of them; returns how many. */
static int64_t spans_of(span *s, int64_t max, const float *c, const int64_t *table, int64_t lo, int64_t len,
                        int64_t block_size, int64_t pos_stride) {
    int64_t n = 0;
    for (int64_t j0 = lo; j0 < len && n < max; n++) {
        const int64_t first = j0 / block_size * block_size;
        const int64_t j1 = first + block_size < len ? first + block_size : len;
        s[n] = (span){c + (table[j0 / block_size] * block_size + j0 - first) * pos_stride, (j1 - j0) * pos_stride};
        j0 = j1;
    }
    return n;
}

/* Asks for share h of `parts` of the first PF_MAX floats of s (NULL: nothing) into L2, a cache
 * line at a time: a stretch ahead is asked for head by head, each head's turn its share, as
 * spreading the requests over the block's work keeps them from queueing up at once. */
static void prefetch_share(const span *s, int64_t h, int64_t parts) {
    if (s == NULL) return;
    const int64_t n = s->n < PF_MAX ? s->n : PF_MAX;
    const int64_t share = (n + parts - 1) / parts, end = (h + 1) * share < n ? (h + 1) * share : n;
    for (int64_t o = h * share; o < end; o += 64 / (int64_t)sizeof(float)) __builtin_prefetch(s->p + o, 0, 2);
}

/* What a call shares with each of its rows: the caches, the block tables, the shapes, the window
 * and the scale; `longest` is the length of a row of the score buffers */
typedef struct {
    const float *kc, *vc;
    const int64_t *block_tables, *row_seq, *lens;
    int64_t heads, group, head_dim, block_size, table_width, window, pos_stride, block_stride, longest;
    float scale, softcap;
} attn_call;

/* The first position a row of length len attends to: len - window with a sliding window */
static int64_t first_position(const attn_call *c, int64_t len) {
    return c->window > 0 && len > c->window ? len - c->window : 0;
}

/* A unit of a call's work: one row, or a tile of QT rows (rows first .. first + QT - 1 of one
 * sequence, each one position further than the one before). It reads positions [lo, len) of its
 * sequence: its first row's first position to its last row's own; block ids from `table`. */
typedef struct {
    int64_t first, count, lo, len;
    const int64_t *table;
} unit;

static unit unit_at(const attn_call *c, int64_t first, int64_t count) {
    return (unit){first, count, first_position(c, c->lens[first]), c->lens[first + count - 1],
                  c->block_tables + c->row_seq[first] * c->table_width};
}

/* The blocks unit u reads */
static int64_t unit_blocks(const attn_call *c, const unit *u) {
    return (u->len - 1) / c->block_size - u->lo / c->block_size + 1;
}

/* Lists in items the stretches unit u reads in the order it reads them (its K blocks, then its V
 * blocks), then, when next is not NULL, the first PF_DIST K stretches of next; returns how many */
static int64_t unit_items(const attn_call *c, const unit *u, const unit *next, span *items) {
    const int64_t nb = unit_blocks(c, u);
    int64_t n = spans_of(items, nb, c->kc, u->table, u->lo, u->len, c->block_size, c->pos_stride);
    n += spans_of(items + n, nb, c->vc, u->table, u->lo, u->len, c->block_size, c->pos_stride);
    if (next != NULL)
        n += spans_of(items + n, PF_DIST, c->kc, next->table, next->lo, next->len, c->block_size, c->pos_stride);
    return n;
}

/* oi [heads, head_dim] = the attention of row i's query qi (the header's formula); items: the n
 * stretches unit_items listed for the row, the one PF_DIST on asked for while each is read; scores: [heads,
 * longest] of scratch. Pass 0 scores every head against the row's keys, pass 1 sums every
 * head's values weighted by its softmax; both block by block, so each block (contiguous) is
 * read from memory once and reused from L1 by every head. Always inlined: as a call of its own,
 * the compiler stopped inlining its helpers into it and the row's loops slowed down. */
static inline __attribute__((always_inline)) void attend_row(const attn_call *c, int64_t i, const float *qi,
                                                             float *oi, const span *items, int64_t n,
                                                             float *scores) {
    const int64_t heads = c->heads, group = c->group, d = c->head_dim, bs = c->block_size;
    const int64_t pos_stride = c->pos_stride, block_stride = c->block_stride, longest = c->longest;
    const float *const kc = c->kc, *const vc = c->vc;
    const int64_t len = c->lens[i], lo = first_position(c, len);
    const int64_t b_lo = lo / bs, nb = (len - 1) / bs - b_lo + 1;
    const int64_t *table = c->block_tables + c->row_seq[i] * c->table_width;
    for (int pass = 0; pass < 2; pass++) {
        if (pass) {
            softmax(scores, heads, longest, lo, len, c->scale, c->softcap);
            for (int64_t e = 0; e < heads * d; e++) oi[e] = 0.0f;
        }
        for (int64_t k = 0; k < nb; k++) {
            const int64_t b = b_lo + k, first = b * bs;
            const int64_t j0 = first > lo ? first : lo, j1 = first + bs < len ? first + bs : len;
            const int64_t t = pass * nb + k;
            const float *cb = (pass ? vc : kc) + table[b] * block_stride;
            const span *next = t + PF_DIST < n ? &items[t + PF_DIST] : NULL;
            for (int64_t h = 0; h < heads; h++) {
                prefetch_share(next, h, heads);
                const float *ch = cb + (h / group) * d;
                float *sh = scores + h * longest;
                if (pass) {
                    weighted_sum(oi + h * d, sh + first, ch, pos_stride, j0 - first, j1 - first, d);
                    continue;
                }
                const float *qh = qi + h * d;
                int64_t j = j0;
                for (; j + PB <= j1; j += PB) dots(qh, ch + (j - first) * pos_stride, pos_stride, d, sh + j);
                for (; j < j1; j++) sh[j] = dot(qh, ch + (j - first) * pos_stride, d);
            }
        }
    }
}

/* The QT rows of tile u, each with attend_row's result bit for bit (q rows from qi, out rows from
 * oi; scores: [QT, heads, longest] of scratch). The rows share their first position (a tile
 * forms only so), and every row reads the positions below the first row's length: over those,
 * each key and value loaded serves all QT rows, the keys scored in attend_row's chunks of PB
 * (the same sums in the same order); each row goes on alone over its remaining positions. So
 * no row reads a position past its own, not even with a zero weight (0 x a NaN is a NaN). */
static inline __attribute__((always_inline)) void attend_tile(const attn_call *c, const unit *u, const float *qi,
                                                              float *oi, const span *items, int64_t n,
                                                              float *scores) {
    const int64_t heads = c->heads, group = c->group, d = c->head_dim, bs = c->block_size;
    const int64_t pos_stride = c->pos_stride, block_stride = c->block_stride, longest = c->longest;
    const int64_t row_stride = heads * d, s_stride = heads * longest, shared = c->lens[u->first];
    const int64_t b_lo = u->lo / bs, nb = unit_blocks(c, u);
    for (int pass = 0; pass < 2; pass++) {
        if (pass) {
            for (int r = 0; r < QT; r++)
                softmax(scores + r * s_stride, heads, longest, u->lo, c->lens[u->first + r], c->scale,
                        c->softcap);
            for (int64_t e = 0; e < QT * row_stride; e++) oi[e] = 0.0f;
        }
        for (int64_t k = 0; k < nb; k++) {
            const int64_t b = b_lo + k, first = b * bs;
            const int64_t j0 = first > u->lo ? first : u->lo;
            const int64_t t = pass * nb + k;
            const float *cb = (pass ? c->vc : c->kc) + u->table[b] * block_stride;
            const span *next = t + PF_DIST < n ? &items[t + PF_DIST] : NULL;
            /* [j0, js): every row's positions in this block; the tile's keys end at a chunk boundary */
            const int64_t js = first + bs < shared ? first + bs : (shared > j0 ? shared : j0);
            const int64_t jt = pass ? js : j0 + (js - j0) / PB * PB;
            for (int64_t h = 0; h < heads; h++) {
                prefetch_share(next, h, heads);
                const float *ch = cb + (h / group) * d;
                float *sh = scores + h * longest;
                if (pass)
                    weighted_sum_tile(oi + h * d, row_stride, sh + first, s_stride, ch, pos_stride, j0 - first,
                                      jt - first, d);
                else
                    for (int64_t j = j0; j + TK <= jt; j += TK)
                        dots_tile(qi + h * d, row_stride, ch + (j - first) * pos_stride, pos_stride, d, sh + j,
                                  s_stride);
                for (int r = 0; r < QT; r++) { /* the row's own positions [jt, j1) of the block */
                    const int64_t len = c->lens[u->first + r], j1 = first + bs < len ? first + bs : len;
                    float *sr = sh + r * s_stride;
                    if (pass) {
                        if (jt < j1) weighted_sum(oi + r * row_stride + h * d, sr + first, ch, pos_stride,
                                                  jt - first, j1 - first, d);
                        continue;
                    }
                    const float *qh = qi + r * row_stride + h * d;
                    int64_t j = jt;
                    for (; j + PB <= j1; j += PB) dots(qh, ch + (j - first) * pos_stride, pos_stride, d, sr + j);
                    for (; j < j1; j++) sr[j] = dot(qh, ch + (j - first) * pos_stride, d);
                }
            }
        }
    }
}

/* Splits the call's rows into units, rows starts[u] .. starts[u + 1] - 1 (starts: rows + 1
 * entries): a tile where QT rows in a row are consecutive tokens of one sequence sharing their
 * first position, else one row. A tile reads the union of its rows' positions, which the
 * entry point's checks of each row covered. Returns how many; *most_blocks: the most blocks a
 * unit reads. */
static int64_t split_units(const attn_call *c, int64_t rows, int64_t *starts, int64_t *most_blocks) {
    int64_t units = 0;
    *most_blocks = 1;
    for (int64_t i = 0; i < rows;) {
        int64_t t = 1;
        while (t < QT && i + t < rows && c->row_seq[i + t] == c->row_seq[i] && c->lens[i + t] == c->lens[i] + t &&
               first_position(c, c->lens[i + t]) == first_position(c, c->lens[i]))
            t++;
        if (t < QT) t = 1;
        const unit u = unit_at(c, i, t);
        if (unit_blocks(c, &u) > *most_blocks) *most_blocks = unit_blocks(c, &u);
        starts[units++] = i;
        i += t;
    }
    starts[units] = rows;
    return units;
}

/* Returns 0; -1 (nothing written) for shapes beyond the limits above or empty ones, heads that
 * are not a multiple of kv_heads, a negative window or soft cap, a row whose sequence is not a row of the
 * block table, a length outside [1, table_width * block_size], or a block id outside the cache
 * for a position the row reads; -2 when out of memory. */
int paged_attention(float *out, const float *q, const float *kc, const float *vc, const int64_t *block_tables,
                    const int64_t *row_seq, const int64_t *lens, int64_t rows, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t num_seqs, int64_t table_width,
                    int64_t window, float scale, float softcap) {
    if (rows < 0 || heads < 1 || kv_heads < 1 || head_dim < 1 || head_dim > MAX_HEAD_DIM) return -1;
    if (!(softcap >= 0.0f)) return -1;
    if (num_blocks < 1 || block_size < 1 || num_seqs < 0 || table_width < 1 || window < 0) return -1;
    if (table_width > INT64_MAX / block_size) return -1;
    if (rows > 0 && (out == NULL || q == NULL || kc == NULL || vc == NULL || block_tables == NULL ||
                     row_seq == NULL || lens == NULL))
        return -1;
    const int64_t group = heads / kv_heads, max_len = table_width * block_size;
    if (group * kv_heads != heads || max_len > INT64_MAX / (int64_t)sizeof(float) / heads / QT) return -1;
    attn_call c = {kc, vc, block_tables, row_seq, lens, heads, group, head_dim, block_size, table_width, window,
                   kv_heads * head_dim, block_size * kv_heads * head_dim, 1, scale, softcap};
    for (int64_t i = 0; i < rows; i++) {
        const int64_t s = row_seq[i], len = lens[i];
        if (s < 0 || s >= num_seqs || len < 1 || len > max_len) return -1;
        if (len > c.longest) c.longest = len;
        for (int64_t b = first_position(&c, len) / block_size; b <= (len - 1) / block_size; b++) {
            const int64_t blk = block_tables[s * table_width + b];
            if (blk < 0 || blk >= num_blocks) return -1;
        }
    }
    int64_t *starts = malloc(sizeof(int64_t) * (rows + 1));
    if (starts == NULL) return -2;
    int64_t most_blocks;
    const int64_t units = split_units(&c, rows, starts, &most_blocks);
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel if (units > 1) reduction(| : failed)
#endif
    {
        float *scores = malloc(sizeof(float) * (units < rows ? QT : 1) * heads * c.longest); /* tiles: QT rows */
        span *items = malloc(sizeof(span) * (2 * most_blocks + PF_DIST)); /* see unit_items */
        if (scores == NULL || items == NULL) failed = 1;
        int64_t prev = -2;
#ifdef _OPENMP
        const int alone = omp_get_num_threads() == 1;
#pragma omp for schedule(dynamic, ROWS_PER_CHUNK)
#else
        const int alone = 1;
#endif
        for (int64_t v = 0; v < units; v++) {
            if (scores == NULL || items == NULL) continue;
            const unit u = unit_at(&c, starts[v], starts[v + 1] - starts[v]);
            /* the next unit's first stretches, when this thread takes it too (in a team, another may) */
            const int ahead = v + 1 < units && (alone || (v + 1) % ROWS_PER_CHUNK != 0);
            const unit next = ahead ? unit_at(&c, starts[v + 1], starts[v + 2] - starts[v + 1]) : u;
            const int64_t n = unit_items(&c, &u, ahead ? &next : NULL, items);
            if (prev != v - 1) /* this thread's first unit, or units skipped: nothing asked for them yet */
                for (int64_t t = 0; t < PF_DIST && t < n; t++) prefetch_share(&items[t], 0, 1);
            prev = v;
            const int64_t at = u.first * heads * head_dim;
            if (u.count == 1)
                attend_row(&c, u.first, q + at, out + at, items, n, scores);
            else
                attend_tile(&c, &u, q + at, out + at, items, n, scores);
        }
        free(items);
        free(scores);
    }
    free(starts);
    return failed ? -2 : 0;
}
