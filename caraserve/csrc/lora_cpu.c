/* The CPU LoRA delta of one module for every adapter run of a step, in one call:
 *
 *     y[start:end] += scale * (x[start:end] @ A) @ B        for each run (start, end, A, B, rank, scale)
 *
 * x [rows, in] and y [rows, out] are row-major with row strides ldx / ldy; A [in, rank] and
 * B [rank, out] are contiguous row-major (a slot of the adapter pool). Rows go in blocks (eight
 * while a run has that many, then four): a block's shrink (x A) lands in a small buffer that its
 * expand reads at once, so nothing of size rows x rank is allocated, and each block reads A and
 * B once. The inner loops have fixed widths so the compiler keeps the accumulators in vector
 * registers (8 x 1 or 4 x 2 vectors); a block of fewer real rows repeats its last row and stores
 * only the real ones. The weights mostly come from L3 or memory (a step reads each slot once):
 * in the pool's layout the column blocks walk them with a stride, so those loops prefetch
 * ahead; a run may instead point at a packed copy (column panels, read front to back, asking
 * for the lines a few KB on).
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

/* Where a shrink reads vector j of A's row k, rank columns from c, and an expand vector j of B's
 * row r, output columns from o0: in the pool's layout (A [in][rank], B [rank][out]; the column
 * blocks walk them with a stride, so the loops prefetch ahead) or in the packed one
 * (cpu_kernels.packed: A [rank/VL][in][VL], B [out/VL][rank][VL]; each block reads its panels
 * front to back). */
#define A_POOL(k, j) (a + (k) * rank + c + (j) * VL)
#define B_POOL(r, j) (b + (r) * out + o0 + (j) * VL)
#define A_PACKED(k, j) (a + c * in + ((j) * in + (k)) * VL)
#define B_PACKED(r, j) (b + o0 * rank + ((j) * rank + (r)) * VL)
#define PREFETCH_A_POOL(k, nv) __builtin_prefetch(A_POOL((k) + PREFETCH_ROWS, 0))
#define PREFETCH_B_POOL(r, nv) __builtin_prefetch(B_POOL(r, nv)) /* the next column block */
/* A packed panel is read front to back, two rows a cache line: every other row asks for the
 * line PACKED_AHEAD floats on in each of the nv panels it reads (into L2). The weights are in
 * memory at each step, and the hardware prefetcher alone keeps too few lines in flight for
 * loops doing this little work per line. */
#define PACKED_AHEAD 1024
#define PREFETCH_A_PACKED(k, nv)                                                                   \
    do {                                                                                           \
        if (((k) & 1) == 0)                                                                        \
            for (int j_ = 0; j_ < (nv); j_++) __builtin_prefetch(A_PACKED(k, j_) + PACKED_AHEAD, 0, 2); \
    } while (0)
#define PREFETCH_B_PACKED(r, nv)                                                                   \
    do {                                                                                           \
        if (((r) & 1) == 0)                                                                        \
            for (int j_ = 0; j_ < (nv); j_++) __builtin_prefetch(B_PACKED(r, j_) + PACKED_AHEAD, 0, 2); \
    } while (0)

/* The first PACKED_AHEAD floats of a run's weights (of `len`), which the loops' own requests,
 * always that far ahead of the line they read, never cover: asked for one run early, so a run
 * does not begin by waiting on memory (a decode step's runs are short: a few KB to a few
 * hundred per weight). */
static inline void prefetch_head(const float *p, int64_t len) {
    const int64_t n = len < PACKED_AHEAD ? len : PACKED_AHEAD;
    for (int64_t o = 0; o < n; o += 64 / (int64_t)sizeof(float)) __builtin_prefetch(p + o, 0, 2);
}

/* v[i][c : c + NV*VL] = sum_k x_i[k] * A[k][c : c + NV*VL] for the IB rows of a block */
#define SHRINK(NAME, IB, NV, AT, PREFETCH)                                                    \
    static void NAME(const float *const *xr, const float *a, int64_t in, int64_t rank, int64_t c, \
                     float *v) {                                                              \
        vf acc[IB][NV];                                                                       \
        for (int i = 0; i < IB; i++)                                                          \
            for (int j = 0; j < NV; j++) acc[i][j] = (vf){0};                                 \
        for (int64_t k = 0; k < in; k++) {                                                    \
            PREFETCH(k, NV);                                                                  \
            vf av[NV];                                                                        \
            for (int j = 0; j < NV; j++) av[j] = LOAD(AT(k, j));                              \
            for (int i = 0; i < IB; i++) {                                                    \
                const float xv = xr[i][k];                                                    \
                for (int j = 0; j < NV; j++) acc[i][j] += xv * av[j];                         \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < IB; i++)                                                          \
            for (int j = 0; j < NV; j++)                                                      \
                for (int l = 0; l < VL; l++) v[i * rank + c + j * VL + l] = acc[i][j][l];     \
    }

/* y_i[o0 : o0 + NV*VL] += scale * sum_r v[i][r] * B[r][o0 : o0 + NV*VL] for the first `rows` rows */
#define EXPAND(NAME, IB, NV, AT, PREFETCH)                                                    \
    static void NAME(float *const *yr, int rows, const float *v, const float *b, int64_t rank,  \
                     int64_t out, int64_t o0, float scale) {                                  \
        vf acc[IB][NV];                                                                       \
        for (int i = 0; i < IB; i++)                                                          \
            for (int j = 0; j < NV; j++) acc[i][j] = (vf){0};                                 \
        for (int64_t r = 0; r < rank; r++) {                                                  \
            PREFETCH(r, NV);                                                                  \
            vf bv[NV];                                                                        \
            for (int j = 0; j < NV; j++) bv[j] = LOAD(AT(r, j));                              \
            for (int i = 0; i < IB; i++) {                                                    \
                const float vv = v[i * rank + r];                                             \
                for (int j = 0; j < NV; j++) acc[i][j] += vv * bv[j];                         \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < rows; i++)                                                        \
            for (int j = 0; j < NV; j++)                                                      \
                for (int l = 0; l < VL; l++) yr[i][o0 + j * VL + l] += scale * acc[i][j][l];  \
    }

SHRINK(shrink_8_1, 8, 1, A_POOL, PREFETCH_A_POOL)
SHRINK(shrink_4_2, 4, 2, A_POOL, PREFETCH_A_POOL)
SHRINK(shrink_4_1, 4, 1, A_POOL, PREFETCH_A_POOL)
EXPAND(expand_8_1, 8, 1, B_POOL, PREFETCH_B_POOL)
EXPAND(expand_4_2, 4, 2, B_POOL, PREFETCH_B_POOL)
EXPAND(expand_4_1, 4, 1, B_POOL, PREFETCH_B_POOL)
SHRINK(pshrink_8_1, 8, 1, A_PACKED, PREFETCH_A_PACKED)
SHRINK(pshrink_4_2, 4, 2, A_PACKED, PREFETCH_A_PACKED)
SHRINK(pshrink_4_1, 4, 1, A_PACKED, PREFETCH_A_PACKED)
EXPAND(pexpand_8_1, 8, 1, B_PACKED, PREFETCH_B_PACKED)
EXPAND(pexpand_4_2, 4, 2, B_PACKED, PREFETCH_B_PACKED)
EXPAND(pexpand_4_1, 4, 1, B_PACKED, PREFETCH_B_PACKED)

/* The columns past the last full vector: plain loops */
static void shrink_tail(const float *const *xr, int ib, const float *a, int64_t in, int64_t rank, int64_t r0,
                        int64_t r1, float *v) {
    for (; r0 < r1; r0++) {
        for (int i = 0; i < ib; i++) {
            float s = 0.0f;
            for (int64_t k = 0; k < in; k++) s += xr[i][k] * a[k * rank + r0];
            v[i * rank + r0] = s;
        }
    }
}

static void expand_tail(float *const *yr, int rows, const float *v, const float *b, int64_t rank, int64_t out,
                        int64_t o0, int64_t o1, float scale) {
    for (; o0 < o1; o0++) {
        for (int i = 0; i < rows; i++) {
            float s = 0.0f;
            for (int64_t r = 0; r < rank; r++) s += v[i * rank + r] * b[r * out + o0];
            yr[i][o0] += scale * s;
        }
    }
}

/* Rank columns [c0, c1) of one block's shrink; c0 is a multiple of VL */
static void shrink_range(const float *const *xr, int ib, const lora_run *run, int64_t in, int64_t c0, int64_t c1,
                         float *v) {
    const int64_t rank = run->rank;
    int64_t c = c0;
    if (run->packed) {
        if (ib == 8) {
            for (; c < c1; c += VL) pshrink_8_1(xr, run->a, in, rank, c, v);
        } else {
            for (; c + 2 * VL <= c1; c += 2 * VL) pshrink_4_2(xr, run->a, in, rank, c, v);
            for (; c < c1; c += VL) pshrink_4_1(xr, run->a, in, rank, c, v);
        }
        return;
    }
    if (ib == 8) {
        for (; c + VL <= c1; c += VL) shrink_8_1(xr, run->a, in, rank, c, v);
    } else {
        for (; c + 2 * VL <= c1; c += 2 * VL) shrink_4_2(xr, run->a, in, rank, c, v);
        for (; c + VL <= c1; c += VL) shrink_4_1(xr, run->a, in, rank, c, v);
    }
    shrink_tail(xr, ib, run->a, in, rank, c, c1, v);
}

/* Output columns [o0, o1) of one block's expand; o0 is a multiple of VL */
static void expand_range(float *const *yr, int ib, int rows, const lora_run *run, int64_t out, int64_t o0,
                         int64_t o1, const float *v) {
    const int64_t rank = run->rank;
    int64_t c = o0;
    if (run->packed) {
        if (ib == 8) {
            for (; c < o1; c += VL) pexpand_8_1(yr, rows, v, run->b, rank, out, c, run->scale);
        } else {
            for (; c + 2 * VL <= o1; c += 2 * VL) pexpand_4_2(yr, rows, v, run->b, rank, out, c, run->scale);
            for (; c < o1; c += VL) pexpand_4_1(yr, rows, v, run->b, rank, out, c, run->scale);
        }
        return;
    }
    if (ib == 8) {
        for (; c + VL <= o1; c += VL) expand_8_1(yr, rows, v, run->b, rank, out, c, run->scale);
    } else {
        for (; c + 2 * VL <= o1; c += 2 * VL) expand_4_2(yr, rows, v, run->b, rank, out, c, run->scale);
        for (; c + VL <= o1; c += VL) expand_4_1(yr, rows, v, run->b, rank, out, c, run->scale);
    }
    expand_tail(yr, rows, v, run->b, rank, out, c, o1, run->scale);
}

/* A block of rows of one run: ib (8 or 4) rows, `rows` of them real, its shrink in v */
typedef struct {
    const lora_run *run;
    int64_t i0;
    int ib, rows;
    float *v;
} lora_block;

static void block_rows(const lora_block *b, float *y, int64_t ldy, const float *x, int64_t ldx,
                       const float **xr, float **yr) {
    for (int i = 0; i < b->ib; i++) {
        const int64_t row = b->i0 + (i < b->rows ? i : b->rows - 1);
        xr[i] = x + row * ldx;
        yr[i] = y + row * ldy;
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
        float *yr[MAX_IB];
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
            const int64_t c1 = c0 + SHRINK_CHUNK < blk->run->rank ? c0 + SHRINK_CHUNK : blk->run->rank;
            block_rows(blk, y, ldy, x, ldx, xr, yr);
            shrink_range(xr, blk->ib, blk->run, in, c0, c1, blk->v);
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < nexpand; item++) {
            const lora_block *blk = &blocks[item / per_block];
            const int64_t o0 = (item % per_block) * EXPAND_CHUNK;
            if (o0 == 0 && blk + 1 < blocks + nblocks && blk[1].run != blk->run)
                prefetch_head(blk[1].run->b, blk[1].run->b_len); /* the next run's B */
            const int64_t o1 = o0 + EXPAND_CHUNK < out ? o0 + EXPAND_CHUNK : out;
            block_rows(blk, y, ldy, x, ldx, xr, yr);
            expand_range(yr, blk->ib, blk->rows, blk->run, out, o0, o1, blk->v);
        }
    }
    free(blocks), free(shrink_item), free(vbuf);
    return 0;
}
