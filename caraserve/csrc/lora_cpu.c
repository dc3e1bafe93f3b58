/* The CPU LoRA delta of one module for every adapter run of a step, in one call:
 *
 *     y[start:end] += scale * (x[start:end] @ A) @ B        for each run (start, end, A, B, rank, scale)
 *
 * x [rows, in] and y [rows, out] are row-major with row strides ldx / ldy; A [in, rank] and
 * B [rank, out] are contiguous row-major (a slot of the adapter pool). Rows go in blocks (eight
 * while a run has that many, then four): a block's shrink (x A) lands in a small buffer that its
 * expand reads at once, so nothing of size rows x rank is allocated, and each block reads A and
 * B once. Shrink and expand are the same panel product (PANEL), whose inner loops have fixed
 * widths so the compiler keeps the accumulators in vector registers (8 x 1 or 4 x 2 vectors); a
 * block of fewer real rows repeats its last row and stores only the real ones. The weights mostly come from L3 or memory (a step reads each slot once):
 * in the pool's layout the column blocks walk them with a stride, so those loops prefetch
 * ahead; a run may instead point at a packed copy (column panels, read front to back, asking
 * for the lines 16 KB on).
 *
 * Every call is checked before anything is read or written (cpu_kernels.RunTable checks the
 * same first, with messages): rows inside x and y, runs disjoint (the expands of different
 * blocks run in parallel), each run's weights of the call's in / out widths and no longer than
 * the buffers they point into. The caller's word on those buffers is all C can check.
 */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    int64_t start, end;    /* rows [start, end) of x and y */
    const float *a;        /* [a_in, rank] float32 */
    const float *b;        /* [rank, b_out] float32 */
    int64_t rank;          /* in [1, MAX_RANK] */
    int64_t a_in, b_out;   /* the weights' own widths: must be the call's in and out */
    int64_t a_len, b_len;  /* floats readable from a and from b */
    int64_t packed;        /* a, b in the panel layout below (rank and out multiples of 8) */
    float scale;
} lora_run;

/* The struct's size, which cpu_kernels.LoraRun must have (a library and a wrapper of different
 * versions refuse each other instead of reading each other's fields wrong). */
int64_t lora_run_bytes(void) { return (int64_t)sizeof(lora_run); }

#define VL 8             /* floats per vector */
#define MAX_IB 8         /* rows of the tallest block */
#define MAX_RANK 1024    /* ranks the block buffer holds */
#define PREFETCH_ROWS 16 /* how far down A the shrink asks for its column block */
#define MAX_WIDTH (INT64_C(1) << 32) /* in and out: far past any model, and in * rank cannot overflow */

/* GCC vector extensions: AVX registers where the CPU has them, pairs of SSE ones elsewhere */
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vf_u __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float))));
#define LOAD(p) (*(const vf_u *)(p))

/* Both halves of the delta are one product, over a panel of columns [col, col + NV*VL) of a
 * weight W with `depth` rows, for the IB rows of a block:
 *     acc_i = sum_k s_i[k] * W[k][col : col + NV*VL]
 *     d_i[col : col + NV*VL] = acc_i  or (accumulate)  += alpha * acc_i     for its first `rows` rows
 * The shrink: s = the block's x rows, W = A (depth in), d = its v rows (stored). The expand: s = its
 * v rows, W = B (depth rank), d = its y rows (accumulated, alpha = the run's scale).
 * Where vector j of W's row k is: in the pool's layout (A [in][rank], B [rank][out]: row stride ld;
 * the column blocks walk them with a stride, so the loops prefetch ahead, A rows ahead, B the next
 * column block) or in the packed one (cpu_kernels.packed: A [rank/VL][in][VL], B [out/VL][rank][VL];
 * each block reads its panels front to back). */
#define W_POOL(k, j) (w + (k) * ld + col + (j) * VL)
#define W_PACKED(k, j) (w + col * depth + ((j) * depth + (k)) * VL)
#define PREFETCH_ROWS_AHEAD(k, nv) __builtin_prefetch(W_POOL((k) + PREFETCH_ROWS, 0))
#define PREFETCH_NEXT_BLOCK(k, nv) __builtin_prefetch(W_POOL(k, nv))
/* A packed panel is read front to back, two rows a cache line: every other row asks for the
 * line PACKED_AHEAD floats (16 KB) on in each of the nv panels it reads, into L1. The weights
 * are in memory at each step, and the hardware prefetcher alone keeps too few lines in flight
 * for loops doing this little work per line. 16 KB is past the end of most panels (an A panel
 * of 256 input features is 8 KB), so the requests run into the next panels and the next run's
 * weights: a decode step's runs are too short for a nearer distance to cover memory's latency
 * (profiles/HISTORY.md has the distances and hints tried). */
#define PACKED_AHEAD 4096
#define PREFETCH_PACKED(k, nv)                                                                     \
    do {                                                                                           \
        if (((k) & 1) == 0)                                                                        \
            for (int j_ = 0; j_ < (nv); j_++) __builtin_prefetch(W_PACKED(k, j_) + PACKED_AHEAD, 0, 3); \
    } while (0)

/* The first PACKED_AHEAD floats of a run's weights (of `len`), which the loops' own requests,
 * always that far ahead of the line they read, never cover: asked for one run early, so a run
 * does not begin by waiting on memory (a decode step's runs are short: a few KB to a few
 * hundred per weight). */
static inline void prefetch_head(const float *p, int64_t len) {
    const int64_t n = len < PACKED_AHEAD ? len : PACKED_AHEAD;
    for (int64_t o = 0; o < n; o += 64 / (int64_t)sizeof(float)) __builtin_prefetch(p + o, 0, 2);
}

typedef void (*panel_fn)(const float *const *s, float *const *d, int rows, const float *w, int64_t depth,
                         int64_t ld, int64_t col, int accumulate, float alpha);

/* The panel product above with fixed widths (IB rows, NV vectors), so the compiler keeps the
 * accumulators in vector registers (8 x 1 or 4 x 2). */
#define PANEL(NAME, IB, NV, WAT, PREFETCH)                                                        \
    static void NAME(const float *const *s, float *const *d, int rows, const float *w, int64_t depth, \
                     int64_t ld, int64_t col, int accumulate, float alpha) {                      \
        (void)ld;                                                                                 \
        vf acc[IB][NV];                                                                           \
        for (int i = 0; i < IB; i++)                                                              \
            for (int j = 0; j < NV; j++) acc[i][j] = (vf){0};                                     \
        for (int64_t k = 0; k < depth; k++) {                                                     \
            PREFETCH(k, NV);                                                                      \
            vf wv[NV];                                                                            \
            for (int j = 0; j < NV; j++) wv[j] = LOAD(WAT(k, j));                                 \
            for (int i = 0; i < IB; i++) {                                                        \
                const float sv = s[i][k];                                                         \
                for (int j = 0; j < NV; j++) acc[i][j] += sv * wv[j];                             \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < rows; i++)                                                            \
            for (int j = 0; j < NV; j++) {                                                        \
                vf_u *o = (vf_u *)&d[i][col + j * VL];                                            \
                *o = accumulate ? *o + alpha * acc[i][j] : acc[i][j];                             \
            }                                                                                     \
    }

/* Where the CPU has AVX-512, a panel two vectors wide keeps each row's accumulator in one
 * 16-float register, fed by both vectors of W's row k joined: half the multiply-adds of two
 * 8-float accumulators, which is what a core with full-width AVX-512 units gains from. Every
 * output element still sums over k in the same order, so the results are those of PANEL. (It
 * needs __builtin_shufflevector: GCC 12, clang.) */
#if defined(__AVX512F__) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define WIDE_PANELS 1
#endif
#endif
#ifdef WIDE_PANELS
typedef float vw __attribute__((vector_size(2 * VL * sizeof(float))));
#define JOIN(lo, hi) __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define HALF(v, h) __builtin_shufflevector(v, v, 8 * (h), 8 * (h) + 1, 8 * (h) + 2, 8 * (h) + 3, 8 * (h) + 4, \
                                           8 * (h) + 5, 8 * (h) + 6, 8 * (h) + 7)
#define PANEL_WIDE(NAME, IB, WAT, PREFETCH)                                                       \
    static void NAME(const float *const *s, float *const *d, int rows, const float *w, int64_t depth, \
                     int64_t ld, int64_t col, int accumulate, float alpha) {                      \
        (void)ld;                                                                                 \
        vw acc[IB];                                                                               \
        for (int i = 0; i < IB; i++) acc[i] = (vw){0};                                            \
        for (int64_t k = 0; k < depth; k++) {                                                     \
            PREFETCH(k, 2);                                                                       \
            const vw wv = JOIN(LOAD(WAT(k, 0)), LOAD(WAT(k, 1)));                                 \
            for (int i = 0; i < IB; i++) acc[i] += s[i][k] * wv;                                  \
        }                                                                                         \
        for (int i = 0; i < rows; i++)                                                            \
            for (int j = 0; j < 2; j++) {                                                         \
                vf_u *o = (vf_u *)&d[i][col + j * VL];                                            \
                const vf part = j ? HALF(acc[i], 1) : HALF(acc[i], 0);                            \
                *o = accumulate ? *o + alpha * part : part;                                       \
            }                                                                                     \
    }
#define PANEL_2(NAME, IB, WAT, PREFETCH) PANEL_WIDE(NAME, IB, WAT, PREFETCH)
#else
#define PANEL_2(NAME, IB, WAT, PREFETCH) PANEL(NAME, IB, 2, WAT, PREFETCH)
#endif

/* One layout's panels: 8 rows x 2 vectors (where the CPU has 32 vector registers: its
 * accumulators, the weight vectors and a broadcast fit; with 16 registers they would spill, and
 * p8_2 is 0), 8 x 1, 4 x 2, 4 x 1. A wider panel reads each broadcast row value for twice the
 * columns; every output element still sums over k in the same order, so the results are the same. */
typedef struct {
    panel_fn p8_2, p8_1, p4_2, p4_1;
} panel_set;

#ifdef __AVX512VL__
#define PANEL_8_2(SET, WAT, PREFETCH) PANEL_2(SET##_8_2, 8, WAT, PREFETCH)
#define P8_2(SET) SET##_8_2
#else
#define PANEL_8_2(SET, WAT, PREFETCH)
#define P8_2(SET) 0
#endif

#define PANELS(SET, WAT, PREFETCH)                        \
    PANEL_8_2(SET, WAT, PREFETCH)                         \
    PANEL(SET##_8_1, 8, 1, WAT, PREFETCH)                 \
    PANEL_2(SET##_4_2, 4, WAT, PREFETCH)                  \
    PANEL(SET##_4_1, 4, 1, WAT, PREFETCH)                 \
    static const panel_set SET = {P8_2(SET), SET##_8_1, SET##_4_2, SET##_4_1};

PANELS(a_pool, W_POOL, PREFETCH_ROWS_AHEAD)
PANELS(b_pool, W_POOL, PREFETCH_NEXT_BLOCK)
PANELS(packed, W_PACKED, PREFETCH_PACKED)

/* Columns [c0, c1) of one block's panel product (c0 a multiple of VL): whole vectors through
 * `set`, the columns past the last one (the pool layout's; a packed weight's widths are
 * multiples of VL) through plain loops. */
static void panel_range(const panel_set *set, const float *const *s, float *const *d, int ib, int rows,
                        const float *w, int64_t depth, int64_t ld, int64_t c0, int64_t c1, int accumulate,
                        float alpha) {
    int64_t c = c0;
    if (ib == 8) {
        if (set->p8_2 != 0)
            for (; c + 2 * VL <= c1; c += 2 * VL) set->p8_2(s, d, rows, w, depth, ld, c, accumulate, alpha);
        for (; c + VL <= c1; c += VL) set->p8_1(s, d, rows, w, depth, ld, c, accumulate, alpha);
    } else {
        for (; c + 2 * VL <= c1; c += 2 * VL) set->p4_2(s, d, rows, w, depth, ld, c, accumulate, alpha);
        for (; c + VL <= c1; c += VL) set->p4_1(s, d, rows, w, depth, ld, c, accumulate, alpha);
    }
    for (; c < c1; c++)
        for (int i = 0; i < rows; i++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < depth; k++) acc += s[i][k] * w[k * ld + c];
            d[i][c] = accumulate ? d[i][c] + alpha * acc : acc;
        }
}

/* A block of rows of one run: ib (8 or 4) rows, `rows` of them real, its shrink in v */
typedef struct {
    const lora_run *run;
    int64_t i0;
    int ib, rows;
    float *v;
} lora_block;

/* The block's rows of x and y (a block of fewer real rows repeats its last one) and of its v */
static void block_rows(const lora_block *b, float *y, int64_t ldy, const float *x, int64_t ldx,
                       const float **xr, float **yr, float **vr) {
    for (int i = 0; i < b->ib; i++) {
        const int64_t row = b->i0 + (i < b->rows ? i : b->rows - 1);
        xr[i] = x + row * ldx;
        yr[i] = y + row * ldy;
        vr[i] = b->v + i * b->run->rank;
    }
}

#define SHRINK_CHUNK 16 /* rank columns per work item */
#define EXPAND_CHUNK 64 /* output columns per work item */

/* Cuts the runs into row blocks (eight rows while a run has that many, then four), each with
 * its part of vbuf for the shrink, and lists the shrink work items: (block, rank chunk) pairs. */
static void plan_blocks(const lora_run *runs, int64_t nruns, lora_block *blocks, int32_t *shrink_item,
                        float *vbuf) {
    int64_t b = 0, t = 0;
    float *v = vbuf;
    for (int64_t n = 0; n < nruns; n++) {
        const lora_run *run = &runs[n];
        for (int64_t i0 = run->start; i0 < run->end; b++) {
            const int64_t left = run->end - i0;
            const int ib = left >= 8 ? 8 : 4;
            const int rows = (int)(left < ib ? left : ib);
            blocks[b] = (lora_block){run, i0, ib, rows, v};
            for (int64_t c = 0; c < run->rank; c += SHRINK_CHUNK, t++) {
                shrink_item[2 * t] = (int32_t)b;
                shrink_item[2 * t + 1] = (int32_t)(c / SHRINK_CHUNK);
            }
            v += MAX_IB * run->rank;
            i0 += rows;
        }
    }
}

/* Whether one run stays inside the call's buffers: rows within [0, rows), weights of the call's
 * widths, rank within the block buffer, as many floats as the weights need behind a and b. */
static int run_ok(const lora_run *run, int64_t rows, int64_t in, int64_t out) {
    if (run->start < 0 || run->start > run->end || run->end > rows) return 0;
    if (run->rank < 1 || run->rank > MAX_RANK || run->a == NULL || run->b == NULL) return 0;
    if (run->a_in != in || run->b_out != out) return 0;
    if (run->a_len < in * run->rank || run->b_len < run->rank * out) return 0;
    if (run->packed != 0 && run->packed != 1) return 0;
    return !run->packed || (run->rank % VL == 0 && out % VL == 0);
}

/* 1 when every run is inside the buffers and no row belongs to two runs, 0 when not, -2 when
 * out of memory. */
static int runs_ok(const lora_run *runs, int64_t nruns, int64_t rows, int64_t in, int64_t out) {
    for (int64_t n = 0; n < nruns; n++)
        if (!run_ok(&runs[n], rows, in, out)) return 0;
    if (nruns < 2) return 1;
    unsigned char *taken = calloc(rows > 0 ? (size_t)rows : 1, 1);
    if (taken == NULL) return -2;
    int ok = 1;
    for (int64_t n = 0; n < nruns && ok; n++)
        for (int64_t i = runs[n].start; i < runs[n].end && ok; i++) ok = !taken[i]++;
    free(taken);
    return ok;
}

/* y and x have `rows` rows (row strides ldy >= out and ldx >= in unless there is at most one).
 * Returns 0; -1 (nothing read or written) when the call or a run fails the checks above;
 * -2 when out of memory. Work items (a block's rank or output columns) are shared out over the
 * calling thread's OpenMP team when the call is big enough to pay for it: shrinks first, then,
 * after the barrier, expands. */
static int compute_runs(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t in, int64_t out,
                        const lora_run *runs, int64_t nruns);

/* 1 when a call of these arguments stays inside its buffers, 0 when not, -2 when out of memory. */
static int call_ok(const float *y, int64_t ldy, const float *x, int64_t ldx, int64_t rows, int64_t in,
                   int64_t out, const lora_run *runs, int64_t nruns) {
    if (nruns < 0 || rows < 0 || in < 1 || out < 1 || in > MAX_WIDTH || out > MAX_WIDTH) return 0;
    if (nruns > 0 && runs == NULL) return 0;
    if (rows > 0 && (y == NULL || x == NULL)) return 0;
    if (rows > 1 && (ldy < out || ldx < in)) return 0;
    return runs_ok(runs, nruns, rows, in, out);
}

int lora_runs(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t rows, int64_t in, int64_t out,
              const lora_run *runs, int64_t nruns) {
    const int ok = call_ok(y, ldy, x, ldx, rows, in, out, runs, nruns);
    if (ok != 1) return ok == -2 ? -2 : -1;
    return compute_runs(y, ldy, x, ldx, in, out, runs, nruns);
}

/* One adapted module's share of a projection's output: columns [col, col + out) of y, its runs. */
typedef struct {
    int64_t col, out;
    const lora_run *runs;
    int64_t nruns;
} lora_part;

int64_t lora_part_bytes(void) { return (int64_t)sizeof(lora_part); }

/* lora_runs for every part of a projection, each over its own columns of y [rows, y_cols] (a
 * fused q/k/v or gate/up output, or one module's): one call per projection and layer. The parts
 * are checked (columns inside y and apart, every run as lora_runs checks it) before anything is
 * read or written; the return codes are lora_runs'. */
int lora_parts(float *y, int64_t ldy, int64_t y_cols, const float *x, int64_t ldx, int64_t rows, int64_t in,
               const lora_part *parts, int64_t nparts) {
    if (nparts < 0 || (nparts > 0 && parts == NULL) || y_cols < 1 || y_cols > MAX_WIDTH) return -1;
    if (rows > 0 && y == NULL) return -1;
    if (rows > 1 && ldy < y_cols) return -1;
    for (int64_t p = 0; p < nparts; p++) {
        const lora_part *part = &parts[p];
        if (part->col < 0 || part->out < 1 || part->out > y_cols - part->col) return -1;
        for (int64_t q = 0; q < p; q++) /* column ranges apart */
            if (part->col < parts[q].col + parts[q].out && parts[q].col < part->col + part->out) return -1;
        const int ok = call_ok(rows > 0 ? y + part->col : y, ldy, x, ldx, rows, in, part->out, part->runs,
                               part->nruns);
        if (ok != 1) return ok == -2 ? -2 : -1;
    }
    for (int64_t p = 0; p < nparts && rows > 0; p++) {
        const int rc = compute_runs(y + parts[p].col, ldy, x, ldx, in, parts[p].out, parts[p].runs, parts[p].nruns);
        if (rc) return rc;
    }
    return 0;
}

/* The runs' deltas, the checks above passed. */
static int compute_runs(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t in, int64_t out,
                        const lora_run *runs, int64_t nruns) {
    int64_t nblocks = 0, vsize = 0, nshrink = 0, macs = 0;
    for (int64_t n = 0; n < nruns; n++) {
        const lora_run *run = &runs[n];
        const int64_t run_rows = run->end - run->start;
        const int64_t blocks = run_rows / 8 + (run_rows % 8 + 3) / 4; /* as plan_blocks cuts them */
        nblocks += blocks;
        vsize += blocks * MAX_IB * run->rank;
        nshrink += blocks * ((run->rank + SHRINK_CHUNK - 1) / SHRINK_CHUNK);
        macs += run_rows * run->rank * (in + out);
    }
    if (nblocks == 0) return 0;
    lora_block *blocks = malloc(sizeof(lora_block) * nblocks);
    int32_t *shrink_item = malloc(sizeof(int32_t) * 2 * nshrink); /* (block, chunk) per item */
    float *vbuf = malloc(sizeof(float) * vsize);
    if (blocks == NULL || shrink_item == NULL || vbuf == NULL) {
        free(blocks), free(shrink_item), free(vbuf);
        return -2;
    }
    plan_blocks(runs, nruns, blocks, shrink_item, vbuf);
    const int64_t per_block = (out + EXPAND_CHUNK - 1) / EXPAND_CHUNK, nexpand = nblocks * per_block;
#ifdef _OPENMP
#pragma omp parallel if (macs >= 256 * 1024)
#endif
    {
        const float *xr[MAX_IB];
        float *yr[MAX_IB], *vr[MAX_IB];
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < nshrink; item++) {
            const lora_block *blk = &blocks[shrink_item[2 * item]];
            const int64_t c0 = (int64_t)shrink_item[2 * item + 1] * SHRINK_CHUNK;
            if (c0 == 0) { /* a block's first item: the next run's A, or after the last, the first B */
                const lora_block *next = blk + 1 < blocks + nblocks ? blk + 1 : NULL;
                if (next != NULL && next->run != blk->run) prefetch_head(next->run->a, next->run->a_len);
                if (next == NULL) prefetch_head(blocks[0].run->b, blocks[0].run->b_len);
            }
            const lora_run *run = blk->run;
            const int64_t c1 = c0 + SHRINK_CHUNK < run->rank ? c0 + SHRINK_CHUNK : run->rank;
            block_rows(blk, y, ldy, x, ldx, xr, yr, vr);
            panel_range(run->packed ? &packed : &a_pool, xr, vr, blk->ib, blk->ib, run->a, in, run->rank, c0, c1,
                        0, 1.0f);
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < nexpand; item++) {
            const lora_block *blk = &blocks[item / per_block];
            const int64_t o0 = (item % per_block) * EXPAND_CHUNK;
            if (o0 == 0 && blk + 1 < blocks + nblocks && blk[1].run != blk->run)
                prefetch_head(blk[1].run->b, blk[1].run->b_len); /* the next run's B */
            const lora_run *run = blk->run;
            const int64_t o1 = o0 + EXPAND_CHUNK < out ? o0 + EXPAND_CHUNK : out;
            block_rows(blk, y, ldy, x, ldx, xr, yr, vr);
            panel_range(run->packed ? &packed : &b_pool, (const float *const *)vr, yr, blk->ib, blk->rows, run->b,
                        run->rank, out, o0, o1, 1, run->scale);
        }
    }
    free(blocks), free(shrink_item), free(vbuf);
    return 0;
}
