/* Attention of single query tokens on CPU, each against its own KV cache slot: a decode row, or
 * one token of a prompt whose keys are already in the cache (causal by construction).
 *
 *     out[i, h] = softmax_j(scale * q[i, h] . K[slot_i, j, h / G]) @ V[slot_i, j, h / G]
 *
 * over the positions j in [lo_i, len_i): len_i - 1 is the token's own position, and lo_i is
 * max(0, len_i - window) with a sliding window, else 0. G = heads / kv_heads query heads share
 * a KV head (GQA). The cache is [slots, max_len, kv_heads, head_dim] float32,
 * contiguous; q and out are [rows, heads, head_dim]. Each row reads only its own positions: no
 * mask, no padding to the longest context. Scores go eight keys at a time (independent vector
 * chains), the weighted sum of values 64 columns at a time in registers; softmax in float32 with
 * the maximum subtracted. Rows are shared out over the calling thread's OpenMP team.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define VL 8
#define MAX_HEAD_DIM 512

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
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
    for (; c < d; c++) s += a[c] * b[c];
    return s;
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
    for (int p = 0; p < PB; p++) {
        float t = hsum(acc[p]);
        for (int64_t e = c; e < d; e++) t += q[e] * k[p * stride + e];
        s[p] = t;
    }
}

/* o[0:d] = sum_j w[j] * v_j over j in [lo, hi), v_j = v + j * stride: 64 columns at a time in registers */
#define CW 8 /* vectors of columns per pass */
static void weighted_sum(float *o, const float *w, const float *v, int64_t stride, int64_t lo, int64_t hi,
                         int64_t d) {
    int64_t c = 0;
    for (; c + CW * VL <= d; c += CW * VL) {
        vf acc[CW];
        for (int t = 0; t < CW; t++) acc[t] = (vf){0};
        for (int64_t j = lo; j < hi; j++) {
            const float *vj = v + j * stride + c;
            for (int t = 0; t < CW; t++) acc[t] += w[j] * LOAD(vj + t * VL);
        }
        for (int t = 0; t < CW; t++)
            for (int l = 0; l < VL; l++) o[c + t * VL + l] = acc[t][l];
    }
    for (; c < d; c++) {
        float t = 0.0f;
        for (int64_t j = lo; j < hi; j++) t += w[j] * v[j * stride + c];
        o[c] = t;
    }
}

/* Returns 0; -1 (nothing written) for shapes beyond the limits above or empty ones, heads that
 * are not a multiple of kv_heads, a negative window, a length outside [1, max_len] or a slot
 * outside the cache; -2 when out of memory. */
int slot_attention(float *out, const float *q, const float *kc, const float *vc, const int64_t *slots,
                     const int64_t *lens, int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim,
                     int64_t num_slots, int64_t max_len, int64_t window, float scale) {
    if (rows < 0 || heads < 1 || kv_heads < 1 || head_dim < 1 || head_dim > MAX_HEAD_DIM) return -1;
    if (num_slots < 0 || max_len < 1 || window < 0) return -1;
    if (rows > 0 && (out == NULL || q == NULL || kc == NULL || vc == NULL || slots == NULL || lens == NULL))
        return -1;
    const int64_t group = heads / kv_heads;
    if (group * kv_heads != heads) return -1;
    for (int64_t i = 0; i < rows; i++) {
        if (lens[i] < 1 || lens[i] > max_len || slots[i] < 0 || slots[i] >= num_slots) return -1;
    }
    const int64_t pos_stride = kv_heads * head_dim, slot_stride = max_len * pos_stride;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel if (rows > 1) reduction(| : failed)
#endif
    {
        float *scores = malloc(sizeof(float) * max_len);
        if (scores == NULL) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 2)
#endif
        for (int64_t i = 0; i < rows; i++) {
            if (scores == NULL) continue;
            const int64_t len = lens[i];
            const int64_t lo = window > 0 && len > window ? len - window : 0;
            const float *kslot = kc + slots[i] * slot_stride, *vslot = vc + slots[i] * slot_stride;
            for (int64_t g = 0; g < kv_heads; g++) {
                for (int64_t h = 0; h < group; h++) {
                    const float *qh = q + (i * heads + g * group + h) * head_dim;
                    float *oh = out + (i * heads + g * group + h) * head_dim;
                    float *sh = scores;
                    int64_t j = lo;
                    for (; j + PB <= len; j += PB) dots(qh, kslot + j * pos_stride + g * head_dim, pos_stride, head_dim, sh + j);
                    for (; j < len; j++) sh[j] = dot(qh, kslot + j * pos_stride + g * head_dim, head_dim);
                    float mx = -INFINITY, sum = 0.0f;
                    for (j = lo; j < len; j++) {
                        sh[j] *= scale;
                        if (sh[j] > mx) mx = sh[j];
                    }
                    for (j = lo; j < len; j++) {
                        sh[j] = expf(sh[j] - mx);
                        sum += sh[j];
                    }
                    const float inv = 1.0f / sum;
                    for (j = lo; j < len; j++) sh[j] *= inv;
                    weighted_sum(oh, sh, vslot + g * head_dim, pos_stride, lo, len, head_dim);
                }
            }
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
