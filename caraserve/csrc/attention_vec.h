/* The vector arithmetic of the CPU attention kernel (attention_cpu.c): dot products of a query
 * with keys (one query, or a tile of QT queries), the softmax, and weighted sums of values (one
 * row, or a tile of rows), in float32 vectors of VL lanes. A tile's loops do the same operations
 * on every number as the single-row ones, so a row gets the same result either way.
 */
#ifndef CARASERVE_ATTENTION_VEC_H
#define CARASERVE_ATTENTION_VEC_H
#include <math.h>
#include <stdint.h>

#define VL 8
/* Scalar sums of products are written as MADD: with fused multiply-adds in the hardware the
 * compiler otherwise fuses some and pairs others into a vector multiply and two adds, depending
 * on how many terms a call has, and a tile's rows would not get attend_row's numbers to the bit
 * (the vector ones always fuse). Without them nothing fuses, and fmaf would be a library call. */
#if defined(__FMA__) || defined(__aarch64__)
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif
/* A tile: QT queries times TK keys of accumulators (and QT rows times TCW vectors of columns
 * in the weighted sum), plus the vectors loaded, must stay in the vector registers: 32 with
 * AVX-512, 16 without. QT * TK is a multiple of 8 (the shuffle tree sums eight at a time). */
#ifdef __AVX512F__
#define QT 8
#else
#define QT 4
#endif
#define TK 2
#define TCW 2


typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef float vf_u __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float))));
#define LOAD(p) (*(const vf_u *)(p))
#define STORE(p, v) (*(vf_u *)(p) = (v))

static float hsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
}

static float dot(const float *a, const float *b, int64_t d) {
    vf acc = {0};
    int64_t c = 0;
    for (; c + VL <= d; c += VL) acc += LOAD(a + c) * LOAD(b + c);
    float s = hsum(acc);
    for (; c < d; c++) s = MADD(a[c], b[c], s);
    return s;
}

/* Two vectors' lanes picked by eight constant indices (0-7 from a, 8-15 from b): clang's and
 * GCC 12's builtin, or GCC's older one with the indices as a vector */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SHUF8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#endif
#endif
#ifndef SHUF8
#define SHUF8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (vi){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

/* lane p of the result = the sum of the lanes of a[p]: eight horizontal sums as a tree of
 * pairwise shuffles and adds (7 vector adds instead of 56 scalar ones) */
static inline __attribute__((always_inline)) vf hsum8(const vf a[8]) {
    vf t[4], u[2];
    for (int p = 0; p < 4; p++)
        t[p] = SHUF8(a[2 * p], a[2 * p + 1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF8(a[2 * p], a[2 * p + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int p = 0; p < 2; p++)
        u[p] = SHUF8(t[2 * p], t[2 * p + 1], 0, 1, 8, 9, 4, 5, 12, 13) + SHUF8(t[2 * p], t[2 * p + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUF8(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUF8(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* s[p] = q . k_p for the PB keys k_p = k + p * stride: PB independent accumulator chains */
#define PB 8
static void dots(const float *q, const float *k, int64_t stride, int64_t d, float *s) {
    vf acc[PB];
    for (int p = 0; p < PB; p++) acc[p] = (vf){0};
    int64_t c = 0;
    for (; c + VL <= d; c += VL) {
        const vf qv = LOAD(q + c);
        for (int p = 0; p < PB; p++) acc[p] += qv * LOAD(k + p * stride + c);
    }
    vf r = hsum8(acc);
    for (int64_t e = c; e < d; e++)
        for (int p = 0; p < PB; p++) r[p] = MADD(q[e], k[p * stride + e], r[p]);
    STORE(s, r);
}

/* e^x lane by lane for x <= 0 (softmax scores minus their maximum): 2^n * p(f), x = n ln2 + f,
 * |f| <= ln2 / 2, p of degree 6 (relative error ~2e-7); below -87 the result is 0 */
static vf vexp(vf x) {
    const vf lg2e = (vf){0} + 1.44269504f, ln2_hi = (vf){0} + 0.693359375f, ln2_lo = (vf){0} - 2.12194440e-4f;
    const vf lim = (vf){0} - 87.0f, magic = (vf){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vi below = x < lim;
    x = (vf)(((vi)x & ~below) | ((vi)lim & below));
    vf n = (x * lg2e + magic) - magic;
    vf f = x - n * ln2_hi - n * ln2_lo;
    vf p = (vf){0} + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    return (vf)((vi)(p * (vf)((__builtin_convertvector(n, vi) + 127) << 23)) & ~below);
}

/* o[0:d] += sum_j w[j] * v_j over j in [lo, hi), v_j = v + j * stride: 64 columns at a time in registers */
#define CW 8 /* vectors of columns per pass */
static void weighted_sum(float *o, const float *w, const float *v, int64_t stride, int64_t lo, int64_t hi,
                         int64_t d) {
    int64_t c = 0;
    for (; c + CW * VL <= d; c += CW * VL) {
        vf acc[CW];
        for (int t = 0; t < CW; t++) acc[t] = LOAD(o + c + t * VL);
        for (int64_t j = lo; j < hi; j++) {
            const float *vj = v + j * stride + c;
            for (int t = 0; t < CW; t++) acc[t] += w[j] * LOAD(vj + t * VL);
        }
        for (int t = 0; t < CW; t++) STORE(o + c + t * VL, acc[t]);
    }
    for (; c < d; c++) {
        float t = o[c];
        for (int64_t j = lo; j < hi; j++) t = MADD(w[j], v[j * stride + c], t);
        o[c] = t;
    }
}

/* s[r * s_stride + p] = q_r . k_p for the QT queries q_r = q + r * q_stride and the TK keys
 * k_p = k + p * stride: QT x TK independent chains, summed eight at a time by the shuffle tree */
static void dots_tile(const float *q, int64_t q_stride, const float *k, int64_t stride, int64_t d, float *s,
                      int64_t s_stride) {
    vf acc[QT * TK];
    for (int a = 0; a < QT * TK; a++) acc[a] = (vf){0};
    int64_t c = 0;
    for (; c + VL <= d; c += VL) {
        vf kv[TK];
        for (int p = 0; p < TK; p++) kv[p] = LOAD(k + p * stride + c);
        for (int r = 0; r < QT; r++) {
            const vf qv = LOAD(q + r * q_stride + c);
            for (int p = 0; p < TK; p++) acc[r * TK + p] += qv * kv[p];
        }
    }
    for (int g = 0; g < QT * TK / 8; g++) { /* lane l of sums: query 8 / TK * g + l / TK, key l % TK */
        vf sums = hsum8(acc + 8 * g);
        for (int l = 0; l < 8; l++) {
            const int r = 8 / TK * g + l / TK, p = l % TK;
            for (int64_t e = c; e < d; e++) sums[l] = MADD(q[r * q_stride + e], k[p * stride + e], sums[l]);
            s[r * s_stride + p] = sums[l];
        }
    }
}

/* o_r[0:d] += sum_j w_r[j] * v_j over j in [lo, hi) for the QT rows o_r = o + r * o_stride,
 * w_r = w + r * w_stride, v_j = v + j * stride: each value vector loaded serves every row. The
 * columns weighted_sum takes in vectors go in vectors, the others through weighted_sum's own
 * loop: the same operations on every number. */
static void weighted_sum_tile(float *o, int64_t o_stride, const float *w, int64_t w_stride, const float *v,
                              int64_t stride, int64_t lo, int64_t hi, int64_t d) {
    const int64_t vectors = d / (CW * VL) * (CW * VL);
    int64_t c = 0;
    for (; c + TCW * VL <= vectors; c += TCW * VL) {
        vf acc[QT][TCW];
        for (int r = 0; r < QT; r++)
            for (int t = 0; t < TCW; t++) acc[r][t] = LOAD(o + r * o_stride + c + t * VL);
        for (int64_t j = lo; j < hi; j++) {
            vf vv[TCW];
            for (int t = 0; t < TCW; t++) vv[t] = LOAD(v + j * stride + c + t * VL);
            for (int r = 0; r < QT; r++) {
                const float x = w[r * w_stride + j];
                const vf wr = {x, x, x, x, x, x, x, x};
                for (int t = 0; t < TCW; t++) acc[r][t] += wr * vv[t];
            }
        }
        for (int r = 0; r < QT; r++)
            for (int t = 0; t < TCW; t++) STORE(o + r * o_stride + c + t * VL, acc[r][t]);
    }
    for (int r = 0; r < QT; r++) weighted_sum(o + r * o_stride + c, w + r * w_stride, v + c, stride, lo, hi, d - c);
}

/* Each head's scores [lo, len) (rows of `width` floats) times scale, turned into their softmax:
 * the maximum subtracted, a vector exp, float32 sums. */
static void softmax(float *scores, int64_t heads, int64_t width, int64_t lo, int64_t len, float scale,
                    float softcap) {
    for (int64_t h = 0; h < heads; h++) {
        float *sh = scores + h * width;
        if (softcap > 0.0f) { /* Gemma 2's: cap * tanh(scale * s / cap), then the softmax of those */
            for (int64_t j = lo; j < len; j++) sh[j] = softcap * tanhf(sh[j] * scale / softcap);
        }
        const float sc = softcap > 0.0f ? 1.0f : scale;
        float mx = -INFINITY, sum = 0.0f;
        vf mv = (vf){0} - INFINITY;
        int64_t j = lo;
        for (; j + VL <= len; j += VL) {
            const vf x = LOAD(sh + j) * sc;
            const vi more = x > mv;
            STORE(sh + j, x);
            mv = (vf)(((vi)x & more) | ((vi)mv & ~more));
        }
        for (; j < len; j++) {
            sh[j] *= sc;
            if (sh[j] > mx) mx = sh[j];
        }
        for (int l = 0; l < VL; l++)
            if (mv[l] > mx) mx = mv[l];
        const vf mxv = (vf){0} + mx;
        vf sv = {0};
        j = lo;
        for (; j + VL <= len; j += VL) {
            const vf e = vexp(LOAD(sh + j) - mxv);
            STORE(sh + j, e);
            sv += e;
        }
        for (; j < len; j++) {
            sh[j] = expf(sh[j] - mx);
            sum += sh[j];
        }
        sum += hsum(sv);
        const float inv = 1.0f / sum;
        for (int64_t j = lo; j < len; j++) sh[j] *= inv;
    }
}

#endif
