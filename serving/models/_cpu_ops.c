/*
 * Fused float32 CPU kernels for what surrounds the matmuls of a decode step, compiled into the
 * serving.models._qmm extension (sharing its thread pool, its code path switch set_simd and its
 * thread count set_num_threads, through _qmm_shared.h):
 *
 *   rms_norm          out = x * rsqrt(mean(x^2) + eps) * w, per row
 *   add_rms_norm      residual += x, then out = rms_norm(residual)
 *   rotary            in-place rotary embedding (Hugging Face's rotate_half layout), per-row positions
 *   silu_mul          out = silu(gate) * up, rows of [gate | up]
 *   paged_decode_attention
 *                     one query per sequence against its paged KV cache, read in place, streaming
 *                     (online) softmax; work items (sequence, KV head) on the pool
 *
 * Conventions are _qmm.c's: pointers come in as Python ints (tensor.data_ptr()), nothing is checked
 * about the memory behind them beyond what the optional bound arguments allow; float32, row-major.
 * The AVX2 code carries target attributes and runs when set_simd says so (the default where the CPU
 * has AVX2, FMA and F16C); everything else is portable C. Vector loops take their tails with masked
 * loads and stores, so within a path a value never depends on where it sits in a row.
 *
 * The GIL is released around calls big enough for it to matter (a decode step's norms are ~100 ns
 * of work: releasing and taking the GIL again would cost as much).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef QMM_WITH_CPU_OPS
#define QMM_WITH_CPU_OPS 1
#endif
#include "_qmm_shared.h"

/* -DQMM_NO_SIMD builds the portable code alone (as for _qmm.c). */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(QMM_NO_SIMD)
#define OPS_X86 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,fma")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#endif

/* Elements of work under which a call keeps the GIL and runs on the calling thread alone. */
#define NOGIL_MIN_ELEMS 16384
/* Elementwise kernels: elements of work from which rows are shared with the pool, and per item. */
#define PAR_MIN_ELEMS (1 << 18)
#define PAR_ITEM_ELEMS (1 << 15)
/* Attention: multiply-adds (q.k and p.v over all sequences) from which the pool is used. */
#define ATTN_PAR_MIN_MACS 200000
/* Query heads per KV head, at most (stack arrays of the attention). */
#define ATTN_MAX_GROUP 256
/* Positions per attention chunk (scores kept on the stack), at most. */
#define ATTN_MAX_CHUNK 64
/* Positions per chunk: about this many floats of K (and as many of V) per chunk. */
#ifndef ATTN_CHUNK_FLOATS
#define ATTN_CHUNK_FLOATS 2048
#endif

/* ------------------------------------------------------------------------------------------------ */
/* AVX2 helpers                                                                                     */

#ifdef OPS_X86
/* Lanes 0..n-1 set (n <= 8). */
AVX2_INLINE __m256i tail_mask(size_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#include "_avx2_reduce.h" /* hsum8, hmax8 */

AVX2_INLINE double hsum4d(__m256d v) {
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

/* The eight sums of a0..a7, in one vector. */
AVX2_INLINE __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/*
 * exp(x), 8 lanes, within 2 ulp of the correctly rounded result over the whole float range
 * (subnormal results included, rounded once); exp(+inf) = +inf, exp(-inf) = 0, NaN stays NaN.
 *
 * x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (Cody-Waite: ln2 in two parts, the first
 * with few enough bits that n * ln2_hi is exact); exp(r) by its Taylor polynomial of degree 7
 * (truncation 5e-9 relative on that interval), Horner with FMA; then the product with 2^n, as
 * 2^n1 * 2^n2 (n1 + n2 = n, each a normal power of two), of which only the last multiply rounds.
 */
AVX2_INLINE __m256 exp8(__m256 x) {
    /* min/max return their second operand when either is NaN: x stays NaN. Beyond 89 the result
       is +inf, below -104 it is 0, as it is at those bounds. */
    x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440054690583e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* n in [-150, 128]: n1 = floor(n / 2), n2 = n - n1, both in [-75, 64]. (NaN: garbage scale,
       but p is NaN.) */
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif /* OPS_X86 */

/* ------------------------------------------------------------------------------------------------ */
/* RMS norm, optionally after adding into the residual                                              */

typedef struct {
    const float *x;
    float *res; /* add_rms_norm: residual, updated; NULL: rms_norm */
    const float *w;
    float *out;
    size_t rows, dim, rows_per_item;
    double eps;
    int simd;
} norm_job_t;

/* 1 / sqrt(mean + eps), from the sum of squares in double. */
static inline float rms_scale(double ss, size_t dim, double eps) {
    return (float)(1.0 / sqrt(ss / (double)dim + eps));
}

static void norm_rows_scalar(const norm_job_t *J, size_t r0, size_t r1) {
    const size_t dim = J->dim;
    for (size_t r = r0; r < r1; r++) {
        const float *x = J->x + r * dim;
        float *o = J->out + r * dim;
        double ss = 0.0;
        if (J->res) {
            float *rr = J->res + r * dim;
            for (size_t i = 0; i < dim; i++) {
                float s = x[i] + rr[i];
                rr[i] = s;
                ss += (double)s * (double)s;
            }
            x = rr;
        } else {
            for (size_t i = 0; i < dim; i++) ss += (double)x[i] * (double)x[i];
        }
        const float sc = rms_scale(ss, dim, J->eps);
        for (size_t i = 0; i < dim; i++) o[i] = (x[i] * sc) * J->w[i];
    }
}

#ifdef OPS_X86
#define SQ_ACC(v, a, b)                                                         \
    {                                                                           \
        __m256d lo_ = _mm256_cvtps_pd(_mm256_castps256_ps128(v));               \
        __m256d hi_ = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));             \
        a = _mm256_fmadd_pd(lo_, lo_, a);                                       \
        b = _mm256_fmadd_pd(hi_, hi_, b);                                       \
    }

AVX2_FN static void norm_rows_avx2(const norm_job_t *J, size_t r0, size_t r1) {
    const size_t dim = J->dim, tail = dim % 8, body = dim - tail;
    const __m256i tm = tail_mask(tail);
    for (size_t r = r0; r < r1; r++) {
        const float *x = J->x + r * dim;
        float *o = J->out + r * dim;
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
        size_t i = 0;
        if (J->res) {
            float *rr = J->res + r * dim;
            for (; i + 16 <= body; i += 16) {
                __m256 v0 = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(rr + i));
                __m256 v1 = _mm256_add_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(rr + i + 8));
                _mm256_storeu_ps(rr + i, v0);
                _mm256_storeu_ps(rr + i + 8, v1);
                SQ_ACC(v0, a0, a1) SQ_ACC(v1, a2, a3)
            }
            for (; i < body; i += 8) {
                __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(rr + i));
                _mm256_storeu_ps(rr + i, v);
                SQ_ACC(v, a0, a1)
            }
            if (tail) {
                __m256 v = _mm256_add_ps(_mm256_maskload_ps(x + i, tm), _mm256_maskload_ps(rr + i, tm));
                _mm256_maskstore_ps(rr + i, tm, v);
                SQ_ACC(v, a2, a3)
            }
            x = rr;
        } else {
            for (; i + 16 <= body; i += 16) {
                __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
                SQ_ACC(v0, a0, a1) SQ_ACC(v1, a2, a3)
            }
            for (; i < body; i += 8) {
                __m256 v = _mm256_loadu_ps(x + i);
                SQ_ACC(v, a0, a1)
            }
            if (tail) {
                __m256 v = _mm256_maskload_ps(x + i, tm);
                SQ_ACC(v, a2, a3)
            }
        }
        const double ss = hsum4d(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
        const __m256 sc = _mm256_set1_ps(rms_scale(ss, dim, J->eps));
        for (i = 0; i < body; i += 8) {
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), sc),
                                                  _mm256_loadu_ps(J->w + i)));
        }
        if (tail) {
            __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_maskload_ps(x + i, tm), sc),
                                     _mm256_maskload_ps(J->w + i, tm));
            _mm256_maskstore_ps(o + i, tm, v);
        }
    }
}
#endif

static void norm_task(void *ctx, size_t item) {
    const norm_job_t *J = ctx;
    size_t r0 = item * J->rows_per_item, r1 = r0 + J->rows_per_item < J->rows ? r0 + J->rows_per_item : J->rows;
#ifdef OPS_X86
    if (J->simd) {
        norm_rows_avx2(J, r0, r1);
        return;
    }
#endif
    norm_rows_scalar(J, r0, r1);
}

/* ------------------------------------------------------------------------------------------------ */
/* silu(gate) * up                                                                                  */

typedef struct {
    const float *gu; /* rows x [gate (inter) | up (inter)] */
    float *out;      /* rows x inter */
    size_t rows, inter, rows_per_item;
    int simd;
} silu_job_t;

static void silu_rows_scalar(const silu_job_t *J, size_t r0, size_t r1) {
    const size_t n = J->inter;
    for (size_t r = r0; r < r1; r++) {
        const float *g = J->gu + r * 2 * n, *u = g + n;
        float *o = J->out + r * n;
        for (size_t i = 0; i < n; i++) o[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
    }
}

#ifdef OPS_X86
AVX2_INLINE __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 e = exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

AVX2_FN static void silu_rows_avx2(const silu_job_t *J, size_t r0, size_t r1) {
    const size_t n = J->inter, tail = n % 8, body = n - tail;
    const __m256i tm = tail_mask(tail);
    for (size_t r = r0; r < r1; r++) {
        const float *g = J->gu + r * 2 * n, *u = g + n;
        float *o = J->out + r * n;
        size_t i = 0;
        for (; i < body; i += 8) _mm256_storeu_ps(o + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
        if (tail) {
            _mm256_maskstore_ps(o + i, tm, silu_mul8(_mm256_maskload_ps(g + i, tm), _mm256_maskload_ps(u + i, tm)));
        }
    }
}

AVX2_FN static void exp_avx2(const float *x, float *out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        const __m256i tm = tail_mask(n - i);
        _mm256_maskstore_ps(out + i, tm, exp8(_mm256_maskload_ps(x + i, tm)));
    }
}
#endif

static void silu_task(void *ctx, size_t item) {
    const silu_job_t *J = ctx;
    size_t r0 = item * J->rows_per_item, r1 = r0 + J->rows_per_item < J->rows ? r0 + J->rows_per_item : J->rows;
#ifdef OPS_X86
    if (J->simd) {
        silu_rows_avx2(J, r0, r1);
        return;
    }
#endif
    silu_rows_scalar(J, r0, r1);
}

/* ------------------------------------------------------------------------------------------------ */
/* Rotary embedding, in place                                                                       */

typedef struct {
    float *x;
    size_t rows, heads, head_dim, row_stride, rot_dim, rows_per_item;
    const float *cos, *sin; /* [max_positions, rot_dim] */
    const int64_t *pos;
    int simd;
} rope_job_t;

/*
 * With h = rot_dim / 2: out[i] = x[i] cos[i] - x[i+h] sin[i], out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h]:
 * two products, each rounded, then one sum, as torch computes x * cos + rotate_half(x) * sin.
 */
static void rope_rows_scalar(const rope_job_t *J, size_t r0, size_t r1) {
    const size_t h = J->rot_dim / 2;
    for (size_t r = r0; r < r1; r++) {
        const float *c = J->cos + (size_t)J->pos[r] * J->rot_dim, *s = J->sin + (size_t)J->pos[r] * J->rot_dim;
        float *xr = J->x + r * J->row_stride;
        for (size_t hd = 0; hd < J->heads; hd++) {
            float *x = xr + hd * J->head_dim;
            for (size_t i = 0; i < h; i++) {
                float a = x[i], b = x[i + h];
                float p = a * c[i], q = b * s[i], t = b * c[i + h], u = a * s[i + h];
                x[i] = p - q;
                x[i + h] = t + u;
            }
        }
    }
}

#ifdef OPS_X86
AVX2_FN static void rope_rows_avx2(const rope_job_t *J, size_t r0, size_t r1) {
    const size_t h = J->rot_dim / 2, tail = h % 8, body = h - tail;
    const __m256i tm = tail_mask(tail);
    for (size_t r = r0; r < r1; r++) {
        const float *c = J->cos + (size_t)J->pos[r] * J->rot_dim, *s = J->sin + (size_t)J->pos[r] * J->rot_dim;
        float *xr = J->x + r * J->row_stride;
        for (size_t hd = 0; hd < J->heads; hd++) {
            float *x = xr + hd * J->head_dim;
            size_t i = 0;
            for (; i < body; i += 8) {
                __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + h + i);
                __m256 lo = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)), _mm256_mul_ps(b, _mm256_loadu_ps(s + i)));
                __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + h + i)),
                                          _mm256_mul_ps(a, _mm256_loadu_ps(s + h + i)));
                _mm256_storeu_ps(x + i, lo);
                _mm256_storeu_ps(x + h + i, hi);
            }
            if (tail) {
                __m256 a = _mm256_maskload_ps(x + i, tm), b = _mm256_maskload_ps(x + h + i, tm);
                __m256 lo = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_maskload_ps(c + i, tm)),
                                          _mm256_mul_ps(b, _mm256_maskload_ps(s + i, tm)));
                __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, _mm256_maskload_ps(c + h + i, tm)),
                                          _mm256_mul_ps(a, _mm256_maskload_ps(s + h + i, tm)));
                _mm256_maskstore_ps(x + i, tm, lo);
                _mm256_maskstore_ps(x + h + i, tm, hi);
            }
        }
    }
}
#endif

static void rope_task(void *ctx, size_t item) {
    const rope_job_t *J = ctx;
    size_t r0 = item * J->rows_per_item, r1 = r0 + J->rows_per_item < J->rows ? r0 + J->rows_per_item : J->rows;
#ifdef OPS_X86
    if (J->simd) {
        rope_rows_avx2(J, r0, r1);
        return;
    }
#endif
    rope_rows_scalar(J, r0, r1);
}

/* ------------------------------------------------------------------------------------------------ */
/* Paged decode attention                                                                           */

typedef struct {
    const float *q;
    size_t q_row_stride;
    const float *k, *v; /* [slots, kv_heads, head_dim] */
    const int64_t *tables;
    size_t table_stride;
    const int64_t *lens;
    float *out; /* [batch, heads, head_dim] */
    size_t batch, heads, kv_heads, head_dim, block_size, window, group, chunk;
    float scale;
    int simd;
} attn_job_t;

/*
 * One work item: sequence b, KV head g and the `group` query heads that read it. The visible
 * positions are taken in chunks of up to J->chunk; per chunk and query head: the chunk's scores
 * (on the stack), their max m', and then, with the running max m, sum l and output o (kept in
 * out itself): l = l exp(m - m') + sum exp(s - m'), o = o exp(m - m') + sum exp(s - m') v, m = m'.
 * Finally o /= l.
 */
static void attn_item_scalar(const attn_job_t *J, size_t b, size_t g, size_t start, size_t L) {
    const size_t D = J->head_dim, G = J->group, bs = J->block_size, slot_stride = J->kv_heads * D;
    const float *qb = J->q + b * J->q_row_stride + g * G * D;
    float *ob = J->out + (b * J->heads + g * G) * D;
    const int64_t *table = J->tables + b * J->table_stride;
    float m[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP];
    for (size_t j = 0; j < G; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    memset(ob, 0, G * D * sizeof(float));
    const float *kp[ATTN_MAX_CHUNK], *vp[ATTN_MAX_CHUNK];
    size_t blk = start / bs, off = start % bs; /* where position p0 is: no division per position */
    float s[ATTN_MAX_CHUNK];
    for (size_t p0 = start; p0 < L;) {
        const size_t n = L - p0 < J->chunk ? L - p0 : J->chunk;
        for (size_t i = 0; i < n; i++, off++) {
            if (off == bs) {
                off = 0;
                blk++;
            }
            const size_t at = ((size_t)table[blk] * bs + off) * slot_stride + g * D;
            kp[i] = J->k + at;
            vp[i] = J->v + at;
        }
        for (size_t j = 0; j < G; j++) {
            const float *qj = qb + j * D;
            float *oj = ob + j * D;
            float mc = -INFINITY;
            for (size_t i = 0; i < n; i++) {
                float d = 0.0f;
                for (size_t t = 0; t < D; t++) d += qj[t] * kp[i][t];
                s[i] = d * J->scale;
                if (s[i] > mc) mc = s[i];
            }
            const float mn = m[j] > mc ? m[j] : mc;
            if (mn == -INFINITY) continue; /* every score so far is -inf: nothing to add yet */
            const float alpha = expf(m[j] - mn);
            if (alpha != 1.0f) {
                l[j] *= alpha;
                for (size_t t = 0; t < D; t++) oj[t] *= alpha;
            }
            float sum = 0.0f;
            for (size_t i = 0; i < n; i++) {
                s[i] = expf(s[i] - mn);
                sum += s[i];
            }
            l[j] += sum;
            for (size_t i = 0; i < n; i++) {
                for (size_t t = 0; t < D; t++) oj[t] += s[i] * vp[i][t];
            }
            m[j] = mn;
        }
        p0 += n;
    }
    for (size_t j = 0; j < G; j++) {
        const float inv = 1.0f / l[j];
        for (size_t t = 0; t < D; t++) ob[j * D + t] *= inv;
    }
}

#ifdef OPS_X86
/* Dot products of q with 8 key rows (D floats each); q and the rows past D are masked. */
AVX2_INLINE __m256 dot8(const float *q, const float *const *k, size_t D, __m256i tm) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    size_t t = 0;
    for (; t + 8 <= D; t += 8) {
        const __m256 qv = _mm256_loadu_ps(q + t);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + t), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + t), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + t), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + t), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[4] + t), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[5] + t), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[6] + t), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[7] + t), a7);
    }
    if (t < D) {
        const __m256 qv = _mm256_maskload_ps(q + t, tm);
        a0 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[0] + t, tm), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[1] + t, tm), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[2] + t, tm), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[3] + t, tm), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[4] + t, tm), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[5] + t, tm), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[6] + t, tm), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[7] + t, tm), a7);
    }
    return reduce8(a0, a1, a2, a3, a4, a5, a6, a7);
}

/*
 * o[0 .. NV*8) = o * alpha + sum_i w[i] v_i[0 .. NV*8), the NV accumulators in registers across the
 * chunk's n positions. (NV is a constant where this is inlined: the arrays become registers.)
 */
AVX2_INLINE void pv_tile(const int NV, float *o, const float *const *v, size_t off, const float *w, size_t n,
                         __m256 alpha, int rescale) {
    __m256 acc[8];
    for (int k = 0; k < NV; k++) {
        acc[k] = _mm256_loadu_ps(o + 8 * k);
        if (rescale) acc[k] = _mm256_mul_ps(acc[k], alpha);
    }
    for (size_t i = 0; i < n; i++) {
        const __m256 wi = _mm256_broadcast_ss(w + i);
        const float *vi = v[i] + off;
        for (int k = 0; k < NV; k++) acc[k] = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 8 * k), acc[k]);
    }
    for (int k = 0; k < NV; k++) _mm256_storeu_ps(o + 8 * k, acc[k]);
}

/* The K and V rows of positions p0 .. p0+n-1 (n <= ATTN_MAX_CHUNK), with (blk, off) where p0 is,
   advanced past them. */
static inline void chunk_rows(const attn_job_t *J, const int64_t *table, size_t g, size_t *blk, size_t *off,
                              size_t n, const float **kp, const float **vp) {
    const size_t bs = J->block_size, slot_stride = J->kv_heads * J->head_dim;
    for (size_t i = 0; i < n; i++, (*off)++) {
        if (*off == bs) {
            *off = 0;
            (*blk)++;
        }
        const size_t at = ((size_t)table[*blk] * bs + *off) * slot_stride + g * J->head_dim;
        kp[i] = J->k + at;
        vp[i] = J->v + at;
    }
}

AVX2_FN static void attn_item_avx2(const attn_job_t *J, size_t b, size_t g, size_t start, size_t L) {
    const size_t D = J->head_dim, G = J->group, bs = J->block_size, row_bytes = D * sizeof(float);
    const float *qb = J->q + b * J->q_row_stride + g * G * D;
    float *ob = J->out + (b * J->heads + g * G) * D;
    const int64_t *table = J->tables + b * J->table_stride;
    const __m256i tm = tail_mask(D % 8);
    const __m256 scale = _mm256_set1_ps(J->scale), ninf = _mm256_set1_ps(-INFINITY);
    float m[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP];
    for (size_t j = 0; j < G; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    memset(ob, 0, G * D * sizeof(float));
    /* Double-buffered row pointers: the next chunk's rows are prefetched while this one is computed
       (the cache of one layer is usually out of the CPU caches by the time the next step reads it). */
    const float *kpb[2][ATTN_MAX_CHUNK], *vpb[2][ATTN_MAX_CHUNK];
    _Alignas(32) float s[ATTN_MAX_CHUNK];
    size_t blk = start / bs, off = start % bs;
    size_t n = L - start < J->chunk ? L - start : J->chunk;
    chunk_rows(J, table, g, &blk, &off, n, kpb[0], vpb[0]);
    int cur = 0;
    for (size_t p0 = start; p0 < L; p0 += n, cur ^= 1) {
        n = L - p0 < J->chunk ? L - p0 : J->chunk;
        const float **kp = kpb[cur], **vp = vpb[cur];
        const size_t p1 = p0 + n;
        if (p1 < L) {
            const size_t n1 = L - p1 < J->chunk ? L - p1 : J->chunk;
            const float **kq = kpb[cur ^ 1], **vq = vpb[cur ^ 1];
            chunk_rows(J, table, g, &blk, &off, n1, kq, vq);
            for (size_t i = 0; i < n1; i++) {
                for (size_t o = 0; o < row_bytes; o += 64) {
                    _mm_prefetch((const char *)kq[i] + o, _MM_HINT_T0);
                    _mm_prefetch((const char *)vq[i] + o, _MM_HINT_T0);
                }
            }
        }
        const size_t n8 = (n + 7) & ~(size_t)7;
        for (size_t i = n; i < n8; i++) kp[i] = kp[0]; /* padding rows, scores dropped */
        for (size_t j = 0; j < G; j++) {
            const float *qj = qb + j * D;
            float *oj = ob + j * D;
            __m256 mv = ninf;
            for (size_t i = 0; i < n8; i += 8) {
                __m256 sc = _mm256_mul_ps(dot8(qj, kp + i, D, tm), scale);
                if (i + 8 > n) sc = _mm256_blendv_ps(ninf, sc, _mm256_castsi256_ps(tail_mask(n - i)));
                _mm256_store_ps(s + i, sc);
                mv = _mm256_max_ps(mv, sc);
            }
            const float mc = hmax8(mv);
            const float mn = m[j] > mc ? m[j] : mc;
            if (mn == -INFINITY) continue; /* every score so far is -inf: nothing to add yet */
            /* alpha = exp(m - mn): 0 on the first chunk (m = -inf), 1 while the max stays. */
            const float alpha = _mm256_cvtss_f32(exp8(_mm256_set1_ps(m[j] - mn)));
            const int rescale = alpha != 1.0f;
            const __m256 mnv = _mm256_set1_ps(mn), av = _mm256_set1_ps(alpha);
            __m256 sumv = _mm256_setzero_ps();
            for (size_t i = 0; i < n8; i += 8) {
                __m256 w = exp8(_mm256_sub_ps(_mm256_load_ps(s + i), mnv)); /* padding: exp(-inf) = 0 */
                _mm256_store_ps(s + i, w);
                sumv = _mm256_add_ps(sumv, w);
            }
            l[j] = (rescale ? l[j] * alpha : l[j]) + hsum8(sumv);
            size_t t = 0;
            for (; t + 64 <= D; t += 64) pv_tile(8, oj + t, vp, t, s, n, av, rescale);
            for (; t + 32 <= D; t += 32) pv_tile(4, oj + t, vp, t, s, n, av, rescale);
            for (; t + 8 <= D; t += 8) pv_tile(1, oj + t, vp, t, s, n, av, rescale);
            if (t < D) {
                __m256 acc = _mm256_maskload_ps(oj + t, tm);
                if (rescale) acc = _mm256_mul_ps(acc, av);
                for (size_t i = 0; i < n; i++) {
                    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(s + i), _mm256_maskload_ps(vp[i] + t, tm), acc);
                }
                _mm256_maskstore_ps(oj + t, tm, acc);
            }
            m[j] = mn;
        }
    }
    for (size_t j = 0; j < G; j++) {
        const __m256 inv = _mm256_set1_ps(1.0f / l[j]);
        float *oj = ob + j * D;
        size_t t = 0;
        for (; t + 8 <= D; t += 8) _mm256_storeu_ps(oj + t, _mm256_mul_ps(_mm256_loadu_ps(oj + t), inv));
        if (t < D) _mm256_maskstore_ps(oj + t, tm, _mm256_mul_ps(_mm256_maskload_ps(oj + t, tm), inv));
    }
}
#endif

static void attn_task(void *ctx, size_t item) {
    const attn_job_t *J = ctx;
    const size_t b = item / J->kv_heads, g = item % J->kv_heads;
    const size_t L = (size_t)J->lens[b];
    const size_t start = J->window && L > J->window ? L - J->window : 0;
#ifdef OPS_X86
    if (J->simd) {
        attn_item_avx2(J, b, g, start, L);
        return;
    }
#endif
    attn_item_scalar(J, b, g, start, L);
}

/* ------------------------------------------------------------------------------------------------ */
/* Python API                                                                                       */

static int arg_size(PyObject *o, size_t *v, const char *name) {
    long long x = PyLong_AsLongLong(o);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 0", name);
        return -1;
    }
    if ((unsigned long long)x > ((unsigned long long)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "%s too large", name);
        return -1;
    }
    *v = (size_t)x;
    return 0;
}

static int arg_ptr(PyObject *o, void **p) {
    *p = PyLong_AsVoidPtr(o);
    if (*p == NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null pointer");
    return *p == NULL ? -1 : 0;
}

static int arg_float(PyObject *o, double *v, const char *name) {
    *v = PyFloat_AsDouble(o);
    if (*v == -1.0 && PyErr_Occurred()) return -1;
    if (!isfinite(*v)) {
        PyErr_Format(PyExc_ValueError, "%s must be finite", name);
        return -1;
    }
    return 0;
}

static int nargs_ok(Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi, const char *sig) {
    if (nargs < lo || nargs > hi) {
        PyErr_Format(PyExc_TypeError, "%s: wrong number of arguments (%zd)", sig, nargs);
        return 0;
    }
    return 1;
}

/* Rows per item and number of items for an elementwise job of rows x row_elems; 1 item when the
   job is too small to share. */
static size_t split_rows(size_t rows, size_t row_elems, size_t *rows_per_item) {
    if (rows < 2 || rows * row_elems < PAR_MIN_ELEMS || qmm_num_threads() < 2) {
        *rows_per_item = rows ? rows : 1;
        return rows ? 1 : 0;
    }
    size_t per = PAR_ITEM_ELEMS / (row_elems ? row_elems : 1);
    if (per < 1) per = 1;
    *rows_per_item = per;
    return (rows + per - 1) / per;
}

static void run_job(size_t n_items, qmm_task_fn task, void *ctx, size_t elems) {
    if (elems < NOGIL_MIN_ELEMS) {
        for (size_t i = 0; i < n_items; i++) task(ctx, i);
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    qmm_parallel_for(n_items, 0, task, ctx);
    Py_END_ALLOW_THREADS
}

static PyObject *norm_common(PyObject *const *args, int add) {
    norm_job_t J;
    memset(&J, 0, sizeof J);
    void *x, *res = NULL, *w, *out;
    size_t a = 0;
    if (arg_ptr(args[a++], &x)) return NULL;
    if (add && arg_ptr(args[a++], &res)) return NULL;
    if (arg_ptr(args[a++], &w) || arg_ptr(args[a++], &out) || arg_size(args[a], &J.rows, "rows") ||
        arg_size(args[a + 1], &J.dim, "dim") || arg_float(args[a + 2], &J.eps, "eps")) {
        return NULL;
    }
    if (J.dim == 0 || J.rows == 0) Py_RETURN_NONE;
    J.x = x;
    J.res = res;
    J.w = w;
    J.out = out;
    J.simd = qmm_simd_active();
    size_t n = split_rows(J.rows, J.dim, &J.rows_per_item);
    run_job(n, norm_task, &J, J.rows * J.dim);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(rms_norm_doc,
             "rms_norm(x_ptr, w_ptr, out_ptr, rows, dim, eps)\n--\n\n"
             "out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w for rows x dim float32 (out may be x).\n"
             "The sum of squares is taken in float64.");

static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok(nargs, 6, 6, "rms_norm(x_ptr, w_ptr, out_ptr, rows, dim, eps)")) return NULL;
    return norm_common(args, 0);
}

PyDoc_STRVAR(add_rms_norm_doc,
             "add_rms_norm(x_ptr, residual_ptr, w_ptr, out_ptr, rows, dim, eps)\n--\n\n"
             "residual += x (in place), then out = rms_norm(residual) (out may be x, not residual).");

static PyObject *py_add_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok(nargs, 7, 7, "add_rms_norm(x_ptr, residual_ptr, w_ptr, out_ptr, rows, dim, eps)")) return NULL;
    return norm_common(args, 1);
}

PyDoc_STRVAR(silu_mul_doc,
             "silu_mul(gate_up_ptr, out_ptr, rows, inter)\n--\n\n"
             "out[r] = silu(gate) * up, rows of gate_up being [gate (inter floats) | up (inter floats)];\n"
             "silu(g) = g / (1 + exp(-g)).");

static PyObject *py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok(nargs, 4, 4, "silu_mul(gate_up_ptr, out_ptr, rows, inter)")) return NULL;
    silu_job_t J;
    memset(&J, 0, sizeof J);
    void *gu, *out;
    if (arg_ptr(args[0], &gu) || arg_ptr(args[1], &out) || arg_size(args[2], &J.rows, "rows") ||
        arg_size(args[3], &J.inter, "inter")) {
        return NULL;
    }
    if (J.rows == 0 || J.inter == 0) Py_RETURN_NONE;
    J.gu = gu;
    J.out = out;
    J.simd = qmm_simd_active();
    size_t n = split_rows(J.rows, 3 * J.inter, &J.rows_per_item);
    run_job(n, silu_task, &J, J.rows * J.inter * 3);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(rotary_doc,
             "rotary(x_ptr, rows, heads, head_dim, row_stride, cos_ptr, sin_ptr, rot_dim, positions_ptr\n"
             "       [, max_positions])\n--\n\n"
             "In place: the first `heads` heads (consecutive head_dim vectors) of each row (row r at\n"
             "x + r * row_stride floats) rotate by the cos/sin table rows [.., rot_dim] of positions[r]\n"
             "(int64), in Hugging Face's rotate_half layout over the first rot_dim dims (even, <=\n"
             "head_dim). With max_positions, positions are checked to be in [0, max_positions) first.");

static PyObject *py_rotary(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok(nargs, 9, 10, "rotary(x, rows, heads, head_dim, row_stride, cos, sin, rot_dim, positions[, max])")) {
        return NULL;
    }
    rope_job_t J;
    memset(&J, 0, sizeof J);
    void *x, *c, *s, *pos;
    size_t maxp = 0;
    if (arg_ptr(args[0], &x) || arg_size(args[1], &J.rows, "rows") || arg_size(args[2], &J.heads, "heads") ||
        arg_size(args[3], &J.head_dim, "head_dim") || arg_size(args[4], &J.row_stride, "row_stride") ||
        arg_ptr(args[5], &c) || arg_ptr(args[6], &s) || arg_size(args[7], &J.rot_dim, "rot_dim") ||
        arg_ptr(args[8], &pos) || (nargs > 9 && arg_size(args[9], &maxp, "max_positions"))) {
        return NULL;
    }
    if (J.rot_dim % 2 || J.rot_dim > J.head_dim) {
        PyErr_Format(PyExc_ValueError, "rot_dim (%zu) must be even and <= head_dim (%zu)", J.rot_dim, J.head_dim);
        return NULL;
    }
    if (J.rows > 1 && J.row_stride < J.heads * J.head_dim) {
        PyErr_SetString(PyExc_ValueError, "row_stride is smaller than heads * head_dim");
        return NULL;
    }
    J.x = x;
    J.cos = c;
    J.sin = s;
    J.pos = pos;
    if (nargs > 9) {
        for (size_t r = 0; r < J.rows; r++) {
            if (J.pos[r] < 0 || (uint64_t)J.pos[r] >= maxp) {
                PyErr_Format(PyExc_IndexError, "position %lld of row %zu is outside the tables (%zu rows)",
                             (long long)J.pos[r], r, maxp);
                return NULL;
            }
        }
    }
    if (J.rows == 0 || J.heads == 0 || J.rot_dim == 0) Py_RETURN_NONE;
    J.simd = qmm_simd_active();
    size_t n = split_rows(J.rows, 2 * J.heads * J.rot_dim, &J.rows_per_item);
    run_job(n, rope_task, &J, J.rows * J.heads * J.rot_dim * 2);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(attn_doc,
             "paged_decode_attention(q_ptr, q_row_stride, k_cache_ptr, v_cache_ptr, block_tables_ptr,\n"
             "    table_stride, context_lens_ptr, out_ptr, batch, num_heads, num_kv_heads, head_dim,\n"
             "    block_size, scale, window[, num_slots, table_width])\n--\n\n"
             "out[b] (num_heads x head_dim) = softmax(scale * q[b] . K) V over positions 0..L-1 of\n"
             "sequence b (L = context_lens[b], int64; the query is position L-1; window > 0: only\n"
             "p > L-1-window), position p in cache slot block_tables[b * table_stride + p / block_size]\n"
             "* block_size + p % block_size (int64), caches [slots, num_kv_heads, head_dim]; query head h\n"
             "reads KV head h / (num_heads / num_kv_heads). With num_slots and table_width, the lengths\n"
             "(1 .. table_width * block_size) and the block numbers used are checked first.");

static PyObject *py_paged_decode_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok(nargs, 15, 17, "paged_decode_attention(...)")) return NULL;
    attn_job_t J;
    memset(&J, 0, sizeof J);
    void *q, *k, *v, *tables, *lens, *out;
    double scale;
    size_t num_slots = 0, width = 0;
    if (arg_ptr(args[0], &q) || arg_size(args[1], &J.q_row_stride, "q_row_stride") || arg_ptr(args[2], &k) ||
        arg_ptr(args[3], &v) || arg_ptr(args[4], &tables) || arg_size(args[5], &J.table_stride, "table_stride") ||
        arg_ptr(args[6], &lens) || arg_ptr(args[7], &out) || arg_size(args[8], &J.batch, "batch") ||
        arg_size(args[9], &J.heads, "num_heads") || arg_size(args[10], &J.kv_heads, "num_kv_heads") ||
        arg_size(args[11], &J.head_dim, "head_dim") || arg_size(args[12], &J.block_size, "block_size") ||
        arg_float(args[13], &scale, "scale") || arg_size(args[14], &J.window, "window")) {
        return NULL;
    }
    if (nargs == 16) {
        PyErr_SetString(PyExc_TypeError, "num_slots and table_width go together");
        return NULL;
    }
    if (nargs == 17 && (arg_size(args[15], &num_slots, "num_slots") || arg_size(args[16], &width, "table_width"))) {
        return NULL;
    }
    if (J.kv_heads == 0 || J.heads % J.kv_heads || J.block_size == 0 || J.head_dim == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "num_heads must be a multiple of num_kv_heads (> 0); block_size, head_dim > 0");
        return NULL;
    }
    J.group = J.heads / J.kv_heads;
    if (J.group > ATTN_MAX_GROUP) {
        PyErr_Format(PyExc_ValueError, "at most %d query heads per KV head", ATTN_MAX_GROUP);
        return NULL;
    }
    if (J.batch > 1 && J.q_row_stride < J.heads * J.head_dim) {
        PyErr_SetString(PyExc_ValueError, "q_row_stride is smaller than num_heads * head_dim");
        return NULL;
    }
    J.q = q;
    J.k = k;
    J.v = v;
    J.tables = tables;
    J.lens = lens;
    J.out = out;
    J.scale = (float)scale;
    /* Scores of this many positions per chunk: the chunk's K and V rows stay in L1. */
    size_t chunk = ATTN_CHUNK_FLOATS / J.head_dim;
    J.chunk = chunk < 8 ? 8 : chunk > ATTN_MAX_CHUNK ? ATTN_MAX_CHUNK : chunk & ~(size_t)7;
    double macs = 0.0;
    for (size_t b = 0; b < J.batch; b++) {
        const int64_t L = J.lens[b];
        if (L < 1 || (nargs == 17 && (uint64_t)L > (uint64_t)width * J.block_size)) {
            PyErr_Format(PyExc_ValueError, "context length %lld of sequence %zu is not in 1..%zu", (long long)L, b,
                         width * J.block_size);
            return NULL;
        }
        const size_t start = J.window && (size_t)L > J.window ? (size_t)L - J.window : 0;
        if (nargs == 17) {
            const int64_t *t = J.tables + b * J.table_stride;
            for (size_t i = start / J.block_size; i <= ((size_t)L - 1) / J.block_size; i++) {
                if (t[i] < 0 || ((uint64_t)t[i] + 1) * J.block_size > num_slots) {
                    PyErr_Format(PyExc_IndexError, "block %lld (sequence %zu) is outside the cache (%zu slots)",
                                 (long long)t[i], b, num_slots);
                    return NULL;
                }
            }
        }
        macs += 2.0 * (double)((size_t)L - start) * (double)(J.heads * J.head_dim);
    }
    if (J.batch == 0 || J.heads == 0) Py_RETURN_NONE;
    J.simd = qmm_simd_active();
    const size_t n_items = J.batch * J.kv_heads;
    if (macs < NOGIL_MIN_ELEMS) {
        for (size_t i = 0; i < n_items; i++) attn_task(&J, i);
        Py_RETURN_NONE;
    }
    /* Small jobs on the calling thread alone: waking the pool costs more than they take. */
    const int threads = macs >= ATTN_PAR_MIN_MACS ? 0 : 1;
    Py_BEGIN_ALLOW_THREADS
    qmm_parallel_for(n_items, threads, attn_task, &J);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(exp_doc,
             "_exp(x_ptr, out_ptr, n)\n--\n\n"
             "out = exp(x) for n float32, by the code path in use (for tests of the vector exp).");

static PyObject *py_exp(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok(nargs, 3, 3, "_exp(x_ptr, out_ptr, n)")) return NULL;
    void *x, *out;
    size_t n;
    if (arg_ptr(args[0], &x) || arg_ptr(args[1], &out) || arg_size(args[2], &n, "n")) return NULL;
#ifdef OPS_X86
    if (qmm_simd_active()) {
        exp_avx2(x, out, n);
        Py_RETURN_NONE;
    }
#endif
    for (size_t i = 0; i < n; i++) ((float *)out)[i] = expf(((const float *)x)[i]);
    Py_RETURN_NONE;
}

PyMethodDef qmm_cpu_ops_methods[] = {
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL, rms_norm_doc},
    {"add_rms_norm", (PyCFunction)(void (*)(void))py_add_rms_norm, METH_FASTCALL, add_rms_norm_doc},
    {"rotary", (PyCFunction)(void (*)(void))py_rotary, METH_FASTCALL, rotary_doc},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, silu_mul_doc},
    {"paged_decode_attention", (PyCFunction)(void (*)(void))py_paged_decode_attention, METH_FASTCALL, attn_doc},
    {"_exp", (PyCFunction)(void (*)(void))py_exp, METH_FASTCALL, exp_doc},
    {NULL, NULL, 0, NULL},
};
