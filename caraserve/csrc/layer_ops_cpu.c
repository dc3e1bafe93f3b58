/* The elementwise stages of a decoder layer, each one call of an eager CPU step instead of a
 * chain of small torch ops (float32):
 *
 *   add_rms_norm:     r[t] += x[t] (skipped when x is NULL);  out[t] = w * r[t] / sqrt(mean(r[t]^2) + eps)
 *   rotary_write_kv:  q_out[t, h] = rot_t(q[t, h]);  K[slot[t]] = rot_t(k[t]);  V[slot[t]] = v[t]
 *                     rot_t(x)[i] = x[i] cos[t, i] - x[i + r/2] sin[t, i]          (i <  r/2)
 *                     rot_t(x)[i] = x[i] cos[t, i] + x[i - r/2] sin[t, i]          (r/2 <= i < r)
 *                     rot_t(x)[i] = x[i]                                           (r <= i < d)
 *                     over the first r (rot_dim, even, <= d) of each head's d dimensions: cos/sin [T, r];
 *                     with `interleaved` (GLM's rope) the pairs are (x[2i], x[2i + 1]) instead of
 *                     (x[i], x[i + r/2]), turned alike: the same as the form above on a head whose first
 *                     r dimensions are reordered evens first, then odds (and put back after)
 *
 * where slot[t] = block * block_size + offset names a position of the paged caches [blocks,
 * block_size, kv_heads, head_dim] (contiguous). Rows of x, q, k, v may be strided views (the
 * columns of a fused projection's output); r, out, q_out and cos/sin are contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define VL 8
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vf_u __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float))));
#define LOAD(p) (*(const vf_u *)(p))
#define STORE(p, v) (*(vf_u *)(p) = (v))

/* r[0:d] += x[0:d] (x may be NULL), and returns sum(r^2): four independent vector chains */
static float add_and_square(float *r, const float *x, int64_t d) {
    vf acc[4] = {{0}, {0}, {0}, {0}};
    int64_t i = 0;
    for (; i + 4 * VL <= d; i += 4 * VL)
        for (int u = 0; u < 4; u++) {
            vf v = LOAD(r + i + u * VL);
            if (x != NULL) {
                v += LOAD(x + i + u * VL);
                STORE(r + i + u * VL, v);
            }
            acc[u] += v * v;
        }
    vf a = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float ss = 0.0f;
    for (int l = 0; l < VL; l++) ss += a[l];
    for (; i < d; i++) {
        if (x != NULL) r[i] += x[i];
        ss += r[i] * r[i];
    }
    return ss;
}

/* Returns 0; -1 (nothing written) for shapes out of range or missing pointers. Rows are shared
 * out over the calling thread's OpenMP team (a prefill's thousands of rows). */
int add_rms_norm(float *out, float *residual, const float *x, const float *w, int64_t rows, int64_t dim,
                 int64_t ld_x, float eps) {
    if (rows < 0 || dim < 1 || (x != NULL && ld_x < dim) || !(eps >= 0.0f)) return -1;
    if (rows > 0 && (out == NULL || residual == NULL || w == NULL)) return -1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16))
#endif
    for (int64_t t = 0; t < rows; t++) {
        float *r = residual + t * dim;
        const float inv = 1.0f / sqrtf(add_and_square(r, x == NULL ? NULL : x + t * ld_x, dim) / (float)dim + eps);
        float *o = out + t * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (r[i] * inv);
    }
    return 0;
}

/* Turns the pairs (x[i], x[i + half]), or with `interleaved` (x[2i], x[2i + 1]) (GLM's rope), by
 * pair i's angle; the head's dimensions past 2 * half pass. Two loops, so each vectorizes. */
static void rotate(float *dst, const float *x, const float *c, const float *s, int64_t half, int64_t head_dim,
                   int interleaved) {
    if (interleaved) {
        for (int64_t i = 0; i < half; i++) {
            const float a = x[2 * i], b = x[2 * i + 1];
            dst[2 * i] = a * c[i] - b * s[i];
            dst[2 * i + 1] = b * c[i + half] + a * s[i + half];
        }
    } else {
        for (int64_t i = 0; i < half; i++) {
            const float a = x[i], b = x[i + half];
            dst[i] = a * c[i] - b * s[i];
            dst[i + half] = b * c[i + half] + a * s[i + half];
        }
    }
    if (2 * half < head_dim) memcpy(dst + 2 * half, x + 2 * half, sizeof(float) * (head_dim - 2 * half));
}

/* Returns 0; -1 (nothing written) for shapes out of range, missing pointers, an odd rot_dim or one
 * over head_dim, or a slot outside the caches. */
int rotary_write_kv(float *q_out, const float *q, const float *k, const float *v, const float *cos_t,
                    const float *sin_t, float *k_cache, float *v_cache, const int64_t *slots, int64_t tokens,
                    int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t rot_dim, int64_t ld_q, int64_t ld_k,
                    int64_t ld_v, int64_t num_slots, int64_t interleaved) {
    if (tokens < 0 || heads < 1 || kv_heads < 1 || rot_dim < 2 || rot_dim % 2 || rot_dim > head_dim || num_slots < 1 ||
        (interleaved != 0 && interleaved != 1))
        return -1;
    if (ld_q < heads * head_dim || ld_k < kv_heads * head_dim || ld_v < kv_heads * head_dim) return -1;
    if (tokens > 0 && (q_out == NULL || q == NULL || k == NULL || v == NULL || cos_t == NULL || sin_t == NULL ||
                       k_cache == NULL || v_cache == NULL || slots == NULL))
        return -1;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    const int64_t half = rot_dim / 2, kv_width = kv_heads * head_dim;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (tokens * (heads + kv_heads) * head_dim >= (1 << 16))
#endif
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_t + t * rot_dim, *s = sin_t + t * rot_dim;
        for (int64_t h = 0; h < heads; h++)
            rotate(q_out + (t * heads + h) * head_dim, q + t * ld_q + h * head_dim, c, s, half, head_dim,
                   (int)interleaved);
        float *kc = k_cache + slots[t] * kv_width;
        for (int64_t h = 0; h < kv_heads; h++)
            rotate(kc + h * head_dim, k + t * ld_k + h * head_dim, c, s, half, head_dim, (int)interleaved);
        memcpy(v_cache + slots[t] * kv_width, v + t * ld_v, sizeof(float) * kv_width);
    }
    return 0;
}
