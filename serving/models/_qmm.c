/*
 * serving.models._qmm: CPU matrix multiply for weights in GGUF's Q4_0 / Q4_1 / Q8_0 block formats.
 *
 *   out[M, N] (float32) = x[M, K] (float32) @ W^T,  W: N rows of K/32 blocks, GGUF's bytes.
 *
 * The activations are quantized per block of 32 to int8 (scale d = max|x| / 127, q = x / d rounded
 * half away from zero, clamped to +-127); each weight block is then multiplied with an activation
 * block in integers and the int32 result scaled by d_w * d_x into a float32 accumulator.
 *
 * Q4_0 and Q4_1 use the nibbles q = 0..15 as they are (unsigned operand of maddubs): the offset
 * (-8 * d for Q4_0, m for Q4_1) contributes offset * d_x * sum(q_x), computed from the per-block
 * activation sums s = d_x * sum(q_x) that the quantizer keeps.
 *
 * Pointers come in as Python ints (tensor.data_ptr()); the GIL is released while computing. The
 * work, in items of (block of activation rows, chunk of output columns), is shared by the calling
 * thread and a small persistent pool of worker threads through an atomic counter.
 *
 * The AVX2 code is compiled with target attributes and picked at import time when the CPU has
 * AVX2, FMA and F16C; everything else runs portable C.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_qmm_shared.h"

#if !defined(_WIN32)
#define QMM_THREADS 1
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#endif

/* -DQMM_NO_SIMD builds the portable code alone (to test it on x86). */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(QMM_NO_SIMD)
#define QMM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#endif

#define QK 32
#define FMT_Q4_0 0
#define FMT_Q4_1 1
#define FMT_Q8_0 2

static const size_t BLOCK_BYTES[3] = {18, 20, 34};

/* ------------------------------------------------------------------------------------------------ */
/* Portable helpers                                                                                 */

static inline uint16_t load_u16le(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* IEEE half -> float, subnormals, infinities and NaNs included. */
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    float f;
    if (e == 0) {
        f = (float)m * 0x1p-24f; /* exact: m < 2^10 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

/* Round half away from zero, clamped to [-127, 127]; NaN gives 127 (unspecified input anyway). */
static inline int round_clamp127(float t) {
    float a = fabsf(t), f = floorf(a);
    float r = f + ((a - f >= 0.5f) ? 1.0f : 0.0f);
    if (!(r <= 127.0f)) r = 127.0f;
    int q = (int)r;
    return t < 0.0f ? -q : q;
}

/*
 * Quantize one row of K = 32 * kb floats: q (kb * 32 int8), dx (kb scales), sx (kb values
 * dx * sum(q), only when sx != NULL).
 */
static void quant_row_scalar(const float *x, size_t kb, int8_t *q, float *dx, float *sx) {
    for (size_t b = 0; b < kb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        float d = amax / 127.0f;
        dx[b] = d;
        int sum = 0;
        if (d == 0.0f) {
            memset(q + b * QK, 0, QK);
        } else {
            for (int j = 0; j < QK; j++) {
                int v = round_clamp127(xb[j] / d);
                q[b * QK + j] = (int8_t)v;
                sum += v;
            }
        }
        if (sx) sx[b] = d * (float)sum;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Scratch: the quantized activations, one growing buffer per calling thread                       */

#define SCRATCH_ACTIVATIONS 0 /* the caller's quantized activations */
#define SCRATCH_PANEL 1       /* repacked weight rows, any thread */
typedef struct {
    void *ptr[2];
    size_t cap[2];
} scratch_t;

#ifdef QMM_THREADS
static pthread_key_t g_scratch_key;
static void scratch_free(void *p) {
    scratch_t *s = p;
    if (s) {
        free(s->ptr[0]);
        free(s->ptr[1]);
        free(s);
    }
}
static scratch_t *scratch_get(void) {
    scratch_t *s = pthread_getspecific(g_scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (s && pthread_setspecific(g_scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}
#else
static scratch_t g_scratch;
static scratch_t *scratch_get(void) { return &g_scratch; }
#endif

static void *scratch_reserve(int slot, size_t bytes) {
    scratch_t *s = scratch_get();
    if (!s) return NULL;
    if (s->cap[slot] < bytes) {
        free(s->ptr[slot]);
        s->cap[slot] = 0;
        size_t cap = bytes + bytes / 4 + 4096;
        cap = (cap + 63) & ~(size_t)63;
        s->ptr[slot] = aligned_alloc(64, cap);
        if (!s->ptr[slot]) return NULL;
        s->cap[slot] = cap;
    }
    return s->ptr[slot];
}

/* ------------------------------------------------------------------------------------------------ */
/* The job: what one call computes, and how it is cut into items                                    */

typedef struct {
    int fmt;
    const float *x;     /* M x K */
    const uint8_t *w;   /* N x wrow bytes */
    float *out;         /* M x N */
    size_t M, K, N;
    size_t kb, kbp;     /* blocks per row; row stride (floats) of dx / sx, a multiple of 8 */
    size_t wrow;        /* bytes per weight row */
    int8_t *qx;         /* M x K quantized activations */
    float *dx, *sx;     /* M x kbp */
    size_t mblock;      /* activation rows per item */
    size_t nchunk;      /* output columns per item */
    size_t n_nchunks;   /* items per block of activation rows */
    size_t n_qitems;    /* leading items that quantize activations (0: done before) */
    size_t qrows;       /* activation rows per quantization item */
    size_t n_items;     /* total */
    int simd;           /* 1: AVX2 */
    qmm_task_fn task;   /* set: a job of qmm_parallel_for (item i is task(task_ctx, i)), not a matmul */
    void *task_ctx;
} job_t;

static int g_simd = 0;          /* code path in use: 1 AVX2, 0 scalar */
static int g_simd_available = 0;

/* ---- scalar matmul of a rectangle ---- */

static void mm_rect_scalar(const job_t *J, size_t n0, size_t n1, size_t m0, size_t m1) {
    const int fmt = J->fmt;
    const size_t bb = BLOCK_BYTES[fmt], kb = J->kb;
    for (size_t m = m0; m < m1; m++) {
        const int8_t *qx = J->qx + m * J->K;
        const float *dx = J->dx + m * J->kbp, *sx = J->sx + m * J->kbp;
        float *out = J->out + m * J->N;
        for (size_t n = n0; n < n1; n++) {
            const uint8_t *wr = J->w + n * J->wrow;
            float acc = 0.0f, corr = 0.0f;
            for (size_t b = 0; b < kb; b++) {
                const uint8_t *p = wr + b * bb;
                const int8_t *q = qx + b * QK;
                float d = f16_to_f32(load_u16le(p));
                int s = 0;
                if (fmt == FMT_Q8_0) {
                    const int8_t *wq = (const int8_t *)(p + 2);
                    for (int j = 0; j < QK; j++) s += wq[j] * q[j];
                } else {
                    const uint8_t *nib = p + (fmt == FMT_Q4_1 ? 4 : 2);
                    for (int j = 0; j < 16; j++) s += (nib[j] & 15) * q[j] + (nib[j] >> 4) * q[j + 16];
                    float off = fmt == FMT_Q4_1 ? f16_to_f32(load_u16le(p + 2)) : -8.0f * d;
                    corr += off * sx[b];
                }
                acc += (float)s * (d * dx[b]);
            }
            out[n] = acc + corr;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* AVX2                                                                                             */

#ifdef QMM_X86

#include "_avx2_reduce.h" /* hsum8, hmax8 */

AVX2_INLINE int hsum8i(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 1));
    return _mm_cvtsi128_si32(h);
}

/* The four sums of a0..a3, in one vector. */
AVX2_INLINE __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

AVX2_INLINE __m256i round_half_away_i32(__m256 t) {
    const __m256 sgn = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sgn, t);
    __m256 f = _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m256 up = _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(a, f), _mm256_set1_ps(0.5f), _CMP_GE_OQ),
                              _mm256_set1_ps(1.0f));
    __m256 r = _mm256_min_ps(_mm256_add_ps(f, up), _mm256_set1_ps(127.0f)); /* NaN -> 127 */
    r = _mm256_or_ps(r, _mm256_and_ps(t, sgn));
    return _mm256_cvttps_epi32(r);
}

AVX2_FN static void quant_row_avx2(const float *x, size_t kb, int8_t *q, float *dx, float *sx) {
    const __m256 sgn = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t b = 0; b < kb; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sgn, v0), _mm256_andnot_ps(sgn, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sgn, v2), _mm256_andnot_ps(sgn, v3)));
        float d = hmax8(a) / 127.0f;
        dx[b] = d;
        if (d == 0.0f) {
            _mm256_storeu_si256((__m256i *)(q + b * QK), _mm256_setzero_si256());
            if (sx) sx[b] = 0.0f;
            continue;
        }
        const __m256 dv = _mm256_set1_ps(d);
        __m256i i0 = round_half_away_i32(_mm256_div_ps(v0, dv));
        __m256i i1 = round_half_away_i32(_mm256_div_ps(v1, dv));
        __m256i i2 = round_half_away_i32(_mm256_div_ps(v2, dv));
        __m256i i3 = round_half_away_i32(_mm256_div_ps(v3, dv));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * QK), _mm256_permutevar8x32_epi32(p, order));
        if (sx) {
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            sx[b] = d * (float)hsum8i(s);
        }
    }
}

/* Float16 scales of RN rows (stride wrow) at p, as the first RN lanes of a vector. */
AVX2_INLINE __m128 scales4(const uint8_t *p, size_t wrow, const int RN) {
    uint16_t h0, h1 = 0, h2 = 0, h3 = 0;
    memcpy(&h0, p, 2);
    if (RN > 1) memcpy(&h1, p + wrow, 2);
    if (RN > 2) memcpy(&h2, p + 2 * wrow, 2);
    if (RN > 3) memcpy(&h3, p + 3 * wrow, 2);
    __m128i h = _mm_cvtsi32_si128((int)((uint32_t)h0 | ((uint32_t)h1 << 16)));
    if (RN > 2) h = _mm_insert_epi32(h, (int)((uint32_t)h2 | ((uint32_t)h3 << 16)), 1);
    return _mm_cvtph_ps(h);
}

/*
 * One register tile: RN weight rows (from w, stride wrow) x RM activation rows, over all kb blocks.
 * out points at out[m0][n0]; ldo is its row stride. The accumulators are separate variables
 * (not an array), so that the compiler keeps them all in registers.
 *
 * Per block: d8 holds the RN weight scales twice ([d0 d1 d2 d3 | d0 d1 d2 d3]); s_m = d8 * dx_m,
 * and an in-lane permute of s_m broadcasts d_n * dx_m for row n in one instruction.
 */
#define ACC_DECL(n) __m256 a##n##0 = _mm256_setzero_ps(), a##n##1 = a##n##0, a##n##2 = a##n##0, a##n##3 = a##n##0;
#define QX_STEP(n, m)                                                                                   \
    if (RN > n && RM > m) {                                                                             \
        __m256i q = _mm256_loadu_si256((const __m256i *)(qx + m * ldq + b * QK));                       \
        if (fmt == FMT_Q8_0) q = _mm256_sign_epi8(q, wv);                                               \
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, q), ones);                             \
        a##n##m = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), SCALE_NM(n, m), a##n##m);                    \
    }
#define W_ROW(n)                                                                                           \
    if (RN > n) {                                                                                          \
        const uint8_t *pn = p + n * wrow;                                                                  \
        __m256i wv, aw;                                                                                    \
        if (fmt == FMT_Q8_0) {                                                                             \
            wv = _mm256_loadu_si256((const __m256i *)(pn + 2));                                            \
            aw = _mm256_abs_epi8(wv); /* -128 -> 0x80, read as unsigned 128 */                            \
        } else {                                                                                           \
            __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(pn + qo)));         \
            aw = _mm256_and_si256(_mm256_srlv_epi32(t, shift), low);                                       \
            wv = aw;                                                                                       \
        }                                                                                                  \
        (void)wv;                                                                                          \
        QX_STEP(n, 0) QX_STEP(n, 1) QX_STEP(n, 2) QX_STEP(n, 3)                                            \
    }
#define SCALE_NM(n, m) _mm256_permute_ps(s##m, n * 0x55)
#define SCALE_SET(m) s##m = _mm256_mul_ps(d8, _mm256_broadcast_ss(dx + m * ldd + b))
#define SCALE_M(m)                                                                   \
    if (RM > m) {                                                                    \
        SCALE_SET(m);                                                                \
        if (fmt != FMT_Q8_0) {                                                       \
            c##m = _mm_fmadd_ps(off4, _mm_broadcast_ss(sx + m * ldd + b), c##m);     \
        }                                                                            \
    }
#define STORE_M(m)                                                                              \
    if (RM > m) {                                                                               \
        __m128 c = fmt == FMT_Q4_0 ? _mm_mul_ps(c##m, _mm_set1_ps(-8.0f)) : c##m;               \
        float *o = out + m * ldo;                                                               \
        if (RN == 4) {                                                                          \
            __m128 r = reduce4(a0##m, a1##m, a2##m, a3##m);                                     \
            if (fmt != FMT_Q8_0) r = _mm_add_ps(r, c);                                          \
            _mm_storeu_ps(o, r);                                                                \
        } else {                                                                                \
            float cs[4];                                                                        \
            _mm_storeu_ps(cs, c);                                                               \
            if (fmt == FMT_Q8_0) cs[0] = cs[1] = cs[2] = cs[3] = 0.0f;                          \
            o[0] = hsum8(a0##m) + cs[0];                                                        \
            if (RN > 1) o[1] = hsum8(a1##m) + cs[1];                                            \
            if (RN > 2) o[2] = hsum8(a2##m) + cs[2];                                            \
        }                                                                                       \
    }

AVX2_INLINE void tile_avx2(const int fmt, const int RN, const int RM, const uint8_t *w, size_t wrow,
                           const int8_t *qx, size_t ldq, const float *dx, const float *sx, size_t ldd,
                           size_t kb, float *out, size_t ldo, const uint8_t *pf) {
    const size_t bb = fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : 34;
    const size_t qo = fmt == FMT_Q4_1 ? 4 : 2;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i low = _mm256_set1_epi8(0x0F);
    ACC_DECL(0) ACC_DECL(1) ACC_DECL(2) ACC_DECL(3)
    __m128 c0 = _mm_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (size_t b = 0; b < kb; b++) {
        const uint8_t *p = w + b * bb;
        if (pf) {
            /* The rows of a later tile, contiguous: RN * bb bytes of them per block. */
            const char *q = (const char *)pf + b * RN * bb;
            _mm_prefetch(q, _MM_HINT_T0);
            if (RN * bb > 64) _mm_prefetch(q + 64, _MM_HINT_T0);
            if (RN * bb > 128) _mm_prefetch(q + 128, _MM_HINT_T0);
        }
        const __m128 d4 = scales4(p, wrow, RN);
        const __m128 off4 = fmt == FMT_Q4_1 ? scales4(p + 2, wrow, RN) : d4;
        (void)off4;
        const __m256 d8 = _mm256_set_m128(d4, d4);
        __m256 s0, s1, s2, s3;
        SCALE_M(0) SCALE_M(1) SCALE_M(2) SCALE_M(3)
        W_ROW(0) W_ROW(1) W_ROW(2) W_ROW(3)
    }
    STORE_M(0) STORE_M(1) STORE_M(2) STORE_M(3)
}

typedef void (*tile_fn)(const uint8_t *, size_t, const int8_t *, size_t, const float *, const float *, size_t,
                        size_t, float *, size_t, const uint8_t *);

#define DEF_TILE(F, RN, RM)                                                                                   \
    AVX2_FN static void tile_##F##_##RN##_##RM(const uint8_t *w, size_t wrow, const int8_t *qx, size_t ldq,   \
                                                const float *dx, const float *sx, size_t ldd, size_t kb,      \
                                                float *out, size_t ldo, const uint8_t *pf) {                  \
        tile_avx2(F, RN, RM, w, wrow, qx, ldq, dx, sx, ldd, kb, out, ldo, pf);                                \
    }
/* 4 weight rows x 1-2 activation rows (more would not fit the 16 registers), and single weight
   rows (the last N % 4 columns) x 1-4 activation rows. */
#define DEF_TILES(F)                                                                                     \
    DEF_TILE(F, 4, 1) DEF_TILE(F, 4, 2) DEF_TILE(F, 1, 1) DEF_TILE(F, 1, 2) DEF_TILE(F, 1, 3) DEF_TILE(F, 1, 4)
DEF_TILES(0)
DEF_TILES(1)
DEF_TILES(2)
#define RM_MAX 2
static const tile_fn TILES4[3][RM_MAX] = {{tile_0_4_1, tile_0_4_2}, {tile_1_4_1, tile_1_4_2}, {tile_2_4_1, tile_2_4_2}};
static const tile_fn TILES1[3][4] = {
    {tile_0_1_1, tile_0_1_2, tile_0_1_3, tile_0_1_4},
    {tile_1_1_1, tile_1_1_2, tile_1_1_3, tile_1_1_4},
    {tile_2_1_1, tile_2_1_2, tile_2_1_3, tile_2_1_4},
};
/* With one or two activation rows, weights stream from RAM: prefetch the rows of the tile this
   many tiles ahead (the hardware prefetcher alone got a third of the bandwidth: each row is a
   short stream of its own). */
#define PF_TILES 2

/*
 * Panels, for several activation rows: 8 weight rows repacked (per block) so that a vector holds
 * 4 consecutive weights of each of the 8 rows, [r0 k0..3, r1 k0..3, ..., r7 k0..3]. Multiplied by
 * 4 activation bytes broadcast to all lanes, maddubs + madd give the 8 rows' partial dots in the 8
 * int32 lanes: the accumulator lanes are output columns, no horizontal sums, and one scale
 * multiply per block and activation row serves 8 columns.
 *
 * Per block: Q4: 8 vectors of nibbles (0..15), then float d[8] and offset[8] (-8 d or m);
 *            Q8: 8 vectors |q|, 8 vectors q (for the sign), then float d[8].
 */
#define PANEL_ROWS 8
static inline size_t panel_block_bytes(int fmt) { return fmt == FMT_Q8_0 ? 544 : 320; }

AVX2_INLINE void transpose8x8_epi32(__m256i *v) {
    __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    __m256i t4 = _mm256_unpacklo_epi32(v[4], v[5]), t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    __m256i t6 = _mm256_unpacklo_epi32(v[6], v[7]), t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    v[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    v[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    v[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    v[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    v[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    v[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    v[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    v[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

AVX2_INLINE __m256 scales8(const uint8_t *p, size_t wrow) {
    uint16_t h[8];
    for (int r = 0; r < 8; r++) memcpy(&h[r], p + r * wrow, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

AVX2_INLINE void panel_pack(const int fmt, const uint8_t *w, size_t wrow, size_t kb, uint8_t *pk,
                            const uint8_t *pf) {
    const size_t bb = fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : 34;
    const size_t qo = fmt == FMT_Q4_1 ? 4 : 2;
    const size_t pb = fmt == FMT_Q8_0 ? 544 : 320;
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (size_t b = 0; b < kb; b++) {
        const uint8_t *p = w + b * bb;
        uint8_t *o = pk + b * pb;
        if (pf) {
            /* A later panel's rows (contiguous), 8 * bb bytes of them per block. */
            const char *q = (const char *)pf + b * 8 * bb;
            for (size_t off = 0; off < 8 * bb; off += 64) _mm_prefetch(q + off, _MM_HINT_T0);
        }
        __m256i v[8];
        for (int r = 0; r < 8; r++) {
            if (fmt == FMT_Q8_0) {
                v[r] = _mm256_loadu_si256((const __m256i *)(p + r * wrow + 2));
            } else {
                __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + r * wrow + qo)));
                v[r] = _mm256_and_si256(_mm256_srlv_epi32(t, shift), low);
            }
        }
        transpose8x8_epi32(v);
        __m256 d8 = scales8(p, wrow);
        if (fmt == FMT_Q8_0) {
            for (int j = 0; j < 8; j++) {
                _mm256_store_si256((__m256i *)(o + 32 * j), _mm256_abs_epi8(v[j]));
                _mm256_store_si256((__m256i *)(o + 256 + 32 * j), v[j]);
            }
            _mm256_store_ps((float *)(o + 512), d8);
        } else {
            for (int j = 0; j < 8; j++) _mm256_store_si256((__m256i *)(o + 32 * j), v[j]);
            _mm256_store_ps((float *)(o + 256), d8);
            __m256 off = fmt == FMT_Q4_1 ? scales8(p + 2, wrow) : _mm256_mul_ps(d8, _mm256_set1_ps(-8.0f));
            _mm256_store_ps((float *)(o + 288), off);
        }
    }
}

#define PX(m, j) _mm256_set1_epi32(load_i32(xb + m * ldq + 4 * j))
/* An empty asm on the running sum keeps GCC from reassociating the sums into trees of spilled
   temporaries (it did, and ran at half speed). */
#if defined(__GNUC__)
#define OPAQUE(v) __asm__("" : "+x"(v))
#else
#define OPAQUE(v) ((void)0)
#endif
#define P4_STEP(m, j)                                                          \
    if (RM > m) {                                                              \
        s##m = _mm256_add_epi16(s##m, _mm256_maddubs_epi16(wj, PX(m, j)));     \
        OPAQUE(s##m);                                                          \
    }
#define P8_STEP(m, j)                                                                                     \
    if (RM > m) {                                                                                         \
        s##m = _mm256_add_epi32(                                                                          \
            s##m, _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(PX(m, j), ws)), ones));     \
        OPAQUE(s##m);                                                                                     \
    }
#define P4_J(j)                                                                              \
    {                                                                                        \
        const __m256i wj = _mm256_load_si256((const __m256i *)(o + 32 * j));                 \
        P4_STEP(0, j) P4_STEP(1, j) P4_STEP(2, j) P4_STEP(3, j) P4_STEP(4, j) P4_STEP(5, j) \
    }
#define P8_J(j)                                                                              \
    {                                                                                        \
        const __m256i wa = _mm256_load_si256((const __m256i *)(o + 32 * j));                 \
        const __m256i ws = _mm256_load_si256((const __m256i *)(o + 256 + 32 * j));           \
        P8_STEP(0, j) P8_STEP(1, j) P8_STEP(2, j) P8_STEP(3, j) P8_STEP(4, j) P8_STEP(5, j) \
    }
#define P_FIN(m)                                                                                   \
    if (RM > m) {                                                                                  \
        __m256 sc = _mm256_mul_ps(d8, _mm256_broadcast_ss(dx + m * ldd + b));                      \
        __m256i i32 = fmt == FMT_Q8_0 ? s##m : _mm256_madd_epi16(s##m, ones);                      \
        f##m = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), sc, f##m);                                 \
        if (fmt != FMT_Q8_0) f##m = _mm256_fmadd_ps(off, _mm256_broadcast_ss(sx + m * ldd + b), f##m); \
    }
#define P_ZERO(m) __m256i s##m = _mm256_setzero_si256();
#define P_STORE(m) \
    if (RM > m) _mm256_storeu_ps(out + m * ldo, f##m);

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

AVX2_INLINE void panel_tile(const int fmt, const int RM, const uint8_t *pk, const int8_t *qx, size_t ldq,
                            const float *dx, const float *sx, size_t ldd, size_t kb, float *out, size_t ldo) {
    const size_t pb = fmt == FMT_Q8_0 ? 544 : 320;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0;
    for (size_t b = 0; b < kb; b++) {
        const uint8_t *o = pk + b * pb;
        const int8_t *xb = qx + b * QK;
        P_ZERO(0) P_ZERO(1) P_ZERO(2) P_ZERO(3) P_ZERO(4) P_ZERO(5)
        __m256 d8, off;
        if (fmt == FMT_Q8_0) {
            P8_J(0) P8_J(1) P8_J(2) P8_J(3) P8_J(4) P8_J(5) P8_J(6) P8_J(7)
            d8 = _mm256_load_ps((const float *)(o + 512));
            off = d8;
        } else {
            P4_J(0) P4_J(1) P4_J(2) P4_J(3) P4_J(4) P4_J(5) P4_J(6) P4_J(7)
            d8 = _mm256_load_ps((const float *)(o + 256));
            off = _mm256_load_ps((const float *)(o + 288));
        }
        (void)off;
        P_FIN(0) P_FIN(1) P_FIN(2) P_FIN(3) P_FIN(4) P_FIN(5)
    }
    P_STORE(0) P_STORE(1) P_STORE(2) P_STORE(3) P_STORE(4) P_STORE(5)
}

typedef void (*panel_fn)(const uint8_t *, const int8_t *, size_t, const float *, const float *, size_t, size_t,
                         float *, size_t);
#define DEF_PANEL(F, RM)                                                                                  \
    AVX2_FN static void panel_##F##_##RM(const uint8_t *pk, const int8_t *qx, size_t ldq, const float *dx, \
                                          const float *sx, size_t ldd, size_t kb, float *out, size_t ldo) { \
        panel_tile(F, RM, pk, qx, ldq, dx, sx, ldd, kb, out, ldo);                                        \
    }
#define DEF_PANELS(F) DEF_PANEL(F, 1) DEF_PANEL(F, 2) DEF_PANEL(F, 3) DEF_PANEL(F, 4) DEF_PANEL(F, 5) DEF_PANEL(F, 6)
DEF_PANELS(0)
DEF_PANELS(1)
DEF_PANELS(2)
#define PANEL_ROW(F) {panel_##F##_1, panel_##F##_2, panel_##F##_3, panel_##F##_4, panel_##F##_5, panel_##F##_6}
static const panel_fn PANELS[3][6] = {PANEL_ROW(0), PANEL_ROW(1), PANEL_ROW(2)};

AVX2_FN static void panel_pack_fmt(int fmt, const uint8_t *w, size_t wrow, size_t kb, uint8_t *pk,
                                   const uint8_t *pf) {
    if (fmt == FMT_Q4_0) {
        panel_pack(FMT_Q4_0, w, wrow, kb, pk, pf);
    } else if (fmt == FMT_Q4_1) {
        panel_pack(FMT_Q4_1, w, wrow, kb, pk, pf);
    } else {
        panel_pack(FMT_Q8_0, w, wrow, kb, pk, pf);
    }
}

/* From this many activation rows on, panels beat the 4 x 2 register tiles. */
#define PANEL_MIN_M 3
/* Activation rows per panel tile (accumulators: 2 per row, of 16 registers). */
#define PANEL_RM_Q4 6
#define PANEL_RM_Q8 4

static void mm_rect_avx2(const job_t *J, size_t n0, size_t n1, size_t m0, size_t m1) {
    const tile_fn *t4 = TILES4[J->fmt], *t1 = TILES1[J->fmt];
    const size_t K = J->K, ldd = J->kbp, N = J->N, wrow = J->wrow, kb = J->kb;
    size_t n = n0;
    /* Panels of 8 rows, aligned on multiples of 8 (whatever the chunking, a column always takes
       the same path, so results do not depend on the number of threads). */
    uint8_t *pk = NULL;
    if (J->M >= PANEL_MIN_M && n0 % PANEL_ROWS == 0 && n0 + PANEL_ROWS <= n1) {
        pk = scratch_reserve(SCRATCH_PANEL, kb * panel_block_bytes(J->fmt));
    }
    if (pk) {
        const panel_fn *pt = PANELS[J->fmt];
        const size_t rmax = J->fmt == FMT_Q8_0 ? PANEL_RM_Q8 : PANEL_RM_Q4;
        for (; n + PANEL_ROWS <= n1; n += PANEL_ROWS) {
            /* Prefetch the next panel while packing this one (doubles the speed of small M when the
               weights come from RAM). */
            const uint8_t *pf = n + 2 * PANEL_ROWS <= n1 ? J->w + (n + PANEL_ROWS) * wrow : NULL;
            panel_pack_fmt(J->fmt, J->w + n * wrow, wrow, kb, pk, pf);
            for (size_t m = m0; m < m1;) {
                size_t rm = m1 - m < rmax ? m1 - m : rmax;
                pt[rm - 1](pk, J->qx + m * K, K, J->dx + m * ldd, J->sx + m * ldd, ldd, kb, J->out + m * N + n, N);
                m += rm;
            }
        }
    }
    for (; n + 4 <= n1; n += 4) {
        const uint8_t *w = J->w + n * wrow;
        /* Prefetch a later tile's rows while on the first activation rows. */
        const uint8_t *pf = n + (PF_TILES + 1) * 4 <= n1 ? w + PF_TILES * 4 * wrow : NULL;
        for (size_t m = m0; m < m1;) {
            size_t rm = m1 - m < RM_MAX ? m1 - m : RM_MAX;
            t4[rm - 1](w, wrow, J->qx + m * K, K, J->dx + m * ldd, J->sx + m * ldd, ldd, kb, J->out + m * N + n, N,
                       m == m0 ? pf : NULL);
            m += rm;
        }
    }
    for (; n < n1; n++) {
        const uint8_t *w = J->w + n * wrow;
        for (size_t m = m0; m < m1;) {
            size_t rm = m1 - m < 4 ? m1 - m : 4;
            t1[rm - 1](w, wrow, J->qx + m * K, K, J->dx + m * ldd, J->sx + m * ldd, ldd, kb, J->out + m * N + n, N,
                       NULL);
            m += rm;
        }
    }
}

static void detect_simd(void) {
    unsigned a, b, c, d;
    int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    __builtin_cpu_init();
    g_simd_available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
}
#else
static void detect_simd(void) { g_simd_available = 0; }
#endif /* QMM_X86 */

/* ------------------------------------------------------------------------------------------------ */
/* Items                                                                                            */

static void quant_rows(const job_t *J, size_t m0, size_t m1) {
    const int need_s = J->fmt != FMT_Q8_0;
    for (size_t m = m0; m < m1; m++) {
        const float *x = J->x + m * J->K;
        int8_t *q = J->qx + m * J->K;
        float *dx = J->dx + m * J->kbp, *sx = need_s ? J->sx + m * J->kbp : NULL;
#ifdef QMM_X86
        if (J->simd) {
            quant_row_avx2(x, J->kb, q, dx, sx);
            continue;
        }
#endif
        quant_row_scalar(x, J->kb, q, dx, sx);
    }
}

static void mm_item(const job_t *J, size_t i) {
    size_t mb = i / J->n_nchunks, nc = i % J->n_nchunks;
    size_t m0 = mb * J->mblock, m1 = m0 + J->mblock < J->M ? m0 + J->mblock : J->M;
    size_t n0 = nc * J->nchunk, n1 = n0 + J->nchunk < J->N ? n0 + J->nchunk : J->N;
#ifdef QMM_X86
    if (J->simd) {
        mm_rect_avx2(J, n0, n1, m0, m1);
        return;
    }
#endif
    mm_rect_scalar(J, n0, n1, m0, m1);
}

static void quant_item(const job_t *J, size_t i) {
    size_t m0 = i * J->qrows, m1 = m0 + J->qrows < J->M ? m0 + J->qrows : J->M;
    quant_rows(J, m0, m1);
}

/* ------------------------------------------------------------------------------------------------ */
/* Thread pool                                                                                      */

#ifdef QMM_X86
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__) && defined(__GNUC__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#ifdef QMM_THREADS
static _Atomic int g_threads = 1;      /* wanted: the caller plus g_threads - 1 workers */
static _Atomic long g_spin_ns = 50000; /* how long an idle worker spins before sleeping */
#else
static int g_threads = 1;
static long g_spin_ns = 50000;
#endif

#ifdef QMM_THREADS
/*
 * `word` is (generation << 32) | next item. An odd generation means the job is being written
 * (a seqlock): a worker copies the job only under an even generation and keeps the copy if the
 * generation is unchanged after it; it claims items by compare-and-swap on the whole word, so a
 * late worker can never take an item of a newer job with an older job's parameters. The caller
 * waits for `done` (items finished), never for a worker to show up.
 */
typedef struct {
    pthread_mutex_t busy; /* one calling thread at a time */
    pthread_mutex_t lock; /* sleeping workers */
    pthread_cond_t cond;
    /* Separate cache lines: idle workers spin on `word` while items finish and bump `done`. */
    _Alignas(64) _Atomic uint64_t word;
    _Alignas(64) _Atomic size_t done;
    _Atomic size_t qdone;
    _Alignas(64) _Atomic int sleepers;
    _Atomic int stop;
    job_t job;
    uint32_t start_gen; /* the generation new workers consider seen */
    int nworkers;
    pthread_t *threads;
} pool_t;

static pool_t g_pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
                        .cond = PTHREAD_COND_INITIALIZER};

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Wait (spinning, then yielding) until *counter reaches target. */
static void wait_count(_Atomic size_t *counter, size_t target) {
    unsigned spins = 0;
    while (atomic_load_explicit(counter, memory_order_acquire) < target) {
        if (++spins < 4096) {
            CPU_RELAX();
        } else {
            sched_yield();
        }
    }
}

/* Claim and run items of generation `gen` until none is left. */
static void participate(pool_t *P, const job_t *J, uint32_t gen) {
    uint64_t w = atomic_load_explicit(&P->word, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(w >> 32) != gen) return;
        size_t i = (size_t)(uint32_t)w;
        if (i >= J->n_items) return;
        if (!atomic_compare_exchange_weak_explicit(&P->word, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_acquire)) {
            continue; /* w reloaded */
        }
        if (J->task) {
            J->task(J->task_ctx, i);
        } else if (i < J->n_qitems) {
            quant_item(J, i);
            atomic_fetch_add_explicit(&P->qdone, 1, memory_order_release);
        } else {
            wait_count(&P->qdone, J->n_qitems);
            mm_item(J, i - J->n_qitems);
        }
        atomic_fetch_add_explicit(&P->done, 1, memory_order_release);
        w = atomic_load_explicit(&P->word, memory_order_acquire);
    }
}

static void *worker_main(void *arg) {
    pool_t *P = arg;
    uint32_t seen = P->start_gen;
    for (;;) {
        /* Wait for a new, fully written job: spin a while, then sleep. */
        uint64_t w;
        uint64_t t0 = 0;
        unsigned spins = 0;
        for (;;) {
            if (atomic_load_explicit(&P->stop, memory_order_acquire)) return NULL;
            w = atomic_load_explicit(&P->word, memory_order_acquire);
            uint32_t g = (uint32_t)(w >> 32);
            if (g != seen && !(g & 1)) break;
            if ((++spins & 63) != 0) {
                CPU_RELAX();
                continue;
            }
            uint64_t t = now_ns();
            if (!t0) t0 = t;
            long waited = (long)(t - t0), spin = atomic_load_explicit(&g_spin_ns, memory_order_relaxed);
            if (waited < spin / 4) continue;
            if (waited < spin) {
                /* Give the core to whatever else wants it (torch's own threads, say). */
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&P->lock);
            atomic_fetch_add(&P->sleepers, 1);
            for (;;) {
                if (atomic_load(&P->stop)) break;
                uint32_t g2 = (uint32_t)(atomic_load(&P->word) >> 32);
                if (g2 != seen && !(g2 & 1)) break;
                pthread_cond_wait(&P->cond, &P->lock);
            }
            atomic_fetch_sub(&P->sleepers, 1);
            pthread_mutex_unlock(&P->lock);
            t0 = 0;
        }
        uint32_t gen = (uint32_t)(w >> 32);
        job_t J;
        memcpy(&J, &P->job, sizeof J);
        atomic_thread_fence(memory_order_acquire);
        if ((uint32_t)(atomic_load_explicit(&P->word, memory_order_relaxed) >> 32) != gen) continue;
        seen = gen;
        participate(P, &J, gen);
    }
}

static void pool_stop(pool_t *P) {
    if (P->nworkers == 0) return;
    pthread_mutex_lock(&P->lock);
    atomic_store(&P->stop, 1);
    pthread_cond_broadcast(&P->cond);
    pthread_mutex_unlock(&P->lock);
    for (int i = 0; i < P->nworkers; i++) pthread_join(P->threads[i], NULL);
    free(P->threads);
    P->threads = NULL;
    P->nworkers = 0;
    atomic_store(&P->stop, 0);
}

/* Called with P->busy held. Returns the number of workers running. */
static int pool_ensure(pool_t *P, int nworkers) {
    if (P->nworkers == nworkers) return nworkers;
    pool_stop(P);
    if (nworkers <= 0) return 0;
    P->threads = calloc((size_t)nworkers, sizeof(pthread_t));
    if (!P->threads) return 0;
    /* Workers start at an even generation they consider seen. */
    uint64_t w = atomic_load(&P->word);
    uint32_t g = (uint32_t)(w >> 32);
    if (g & 1) g++;
    atomic_store(&P->word, ((uint64_t)g << 32) | 0xFFFFFFFFu);
    P->start_gen = g;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    /* Workers block all signals: Python handles them on its own threads. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int n = 0;
    for (; n < nworkers; n++) {
        if (pthread_create(&P->threads[n], &attr, worker_main, P) != 0) break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    P->nworkers = n;
    return n;
}

/* Run J on the pool (P->busy held, J->n_items > 0). */
static void pool_run(pool_t *P, const job_t *J) {
    uint64_t w = atomic_load(&P->word);
    uint32_t g = (uint32_t)(w >> 32);
    uint32_t writing = (g & 1) ? g : g + 1, published = writing + 1;
    atomic_store(&P->word, ((uint64_t)writing << 32) | 0xFFFFFFFFu);
    atomic_thread_fence(memory_order_release);
    memcpy(&P->job, J, sizeof *J);
    atomic_store_explicit(&P->done, 0, memory_order_relaxed);
    atomic_store_explicit(&P->qdone, 0, memory_order_relaxed);
    atomic_store(&P->word, (uint64_t)published << 32); /* seq_cst: ordered before reading sleepers */
    if (atomic_load(&P->sleepers) > 0) {
        pthread_mutex_lock(&P->lock);
        pthread_cond_broadcast(&P->cond);
        pthread_mutex_unlock(&P->lock);
    }
    participate(P, J, published);
    wait_count(&P->done, J->n_items);
}

static void atfork_child(void) {
    /* The workers do not exist in the child: forget them; the next call starts new ones. */
    pthread_mutex_init(&g_pool.busy, NULL);
    pthread_mutex_init(&g_pool.lock, NULL);
    pthread_cond_init(&g_pool.cond, NULL);
    atomic_store(&g_pool.sleepers, 0);
    atomic_store(&g_pool.stop, 0);
    g_pool.threads = NULL; /* leaked, as the parent's threads are */
    g_pool.nworkers = 0;
}
#endif /* QMM_THREADS */

/* ------------------------------------------------------------------------------------------------ */
/* The pool for the other kernels of this extension (_qmm_shared.h)                                 */

void qmm_parallel_for(size_t n_items, int max_threads, qmm_task_fn task, void *ctx) {
    if (n_items == 0) return;
#ifdef QMM_THREADS
    int threads = g_threads;
    if (max_threads > 0 && max_threads < threads) threads = max_threads;
    if (threads > 1 && n_items > 1 && n_items < 0xFFFFFFF0u && pthread_mutex_trylock(&g_pool.busy) == 0) {
        if (pool_ensure(&g_pool, threads - 1) > 0) {
            job_t J;
            memset(&J, 0, sizeof J);
            J.n_items = n_items;
            J.task = task;
            J.task_ctx = ctx;
            pool_run(&g_pool, &J);
            pthread_mutex_unlock(&g_pool.busy);
            return;
        }
        pthread_mutex_unlock(&g_pool.busy);
    }
#else
    (void)max_threads;
#endif
    for (size_t i = 0; i < n_items; i++) task(ctx, i);
}

int qmm_simd_active(void) { return g_simd; }

int qmm_num_threads(void) { return g_threads; }

/* ------------------------------------------------------------------------------------------------ */
/* One call                                                                                          */

#define MBLOCK_BYTES (96 * 1024) /* quantized activation rows per item: about this many bytes */

/* Returns 0, or -1 when out of memory. */
static int qmm_compute(int fmt, const float *x, const uint8_t *w, float *out, size_t M, size_t K, size_t N) {
    job_t J;
    memset(&J, 0, sizeof J);
    J.fmt = fmt;
    J.x = x;
    J.w = w;
    J.out = out;
    J.M = M;
    J.K = K;
    J.N = N;
    J.kb = K / QK;
    J.kbp = (J.kb + 7) & ~(size_t)7;
    J.wrow = J.kb * BLOCK_BYTES[fmt];
    J.simd = g_simd;

    size_t qbytes = (M * K + 63) & ~(size_t)63;
    char *buf = scratch_reserve(SCRATCH_ACTIVATIONS, qbytes + 2 * M * J.kbp * sizeof(float));
    if (!buf) return -1;
    J.qx = (int8_t *)buf;
    J.dx = (float *)(buf + qbytes);
    J.sx = J.dx + M * J.kbp;

    int threads = g_threads;
    /* Tiny calls are not worth waking anyone. */
    if ((double)M * (double)K * (double)N < 65536.0) threads = 1;

    /* Items: blocks of activation rows x chunks of output columns. Blocks of rows keep the
       quantized activations that each weight panel sweeps over in L2; equal-sized, in multiples of
       12 rows (of every tile height). */
    size_t mblock = MBLOCK_BYTES / K;
    mblock = mblock < 12 ? 12 : mblock - mblock % 12;
    size_t n_mblocks = (M + mblock - 1) / mblock;
    mblock = (M + n_mblocks - 1) / n_mblocks;
    mblock = (mblock + 11) / 12 * 12;
    if (mblock >= M) mblock = M;
    n_mblocks = (M + mblock - 1) / mblock;
    size_t nchunk = N;
    if (threads > 1) {
        size_t want = (size_t)threads * 6; /* items wanted, for balance when a core is stolen */
        size_t per_mb = (want + n_mblocks - 1) / n_mblocks;
        nchunk = (N + per_mb - 1) / per_mb;
        nchunk = (nchunk + 7) & ~(size_t)7; /* panels of 8 columns never straddle chunks */
        if (nchunk < 16) nchunk = 16;
    }
    if (nchunk > N) nchunk = N;
    J.mblock = mblock;
    J.nchunk = nchunk;
    J.n_nchunks = (N + nchunk - 1) / nchunk;
    size_t n_mm = n_mblocks * J.n_nchunks;

#ifdef QMM_THREADS
    if (threads > 1 && n_mm > 1 && pthread_mutex_trylock(&g_pool.busy) == 0) {
        if (pool_ensure(&g_pool, threads - 1) > 0) {
            /* Large inputs are quantized by items of the same job. */
            if (M * K >= 65536 && M > 1) {
                J.qrows = 16384 / K ? 16384 / K : 1;
                J.n_qitems = (M + J.qrows - 1) / J.qrows;
            } else {
                quant_rows(&J, 0, M);
            }
            J.n_items = J.n_qitems + n_mm;
            if (J.n_items < 0xFFFFFFF0u) { /* item numbers are 32 bits in the pool's word */
                pool_run(&g_pool, &J);
                pthread_mutex_unlock(&g_pool.busy);
                return 0;
            }
            J.n_qitems = 0;
        }
        pthread_mutex_unlock(&g_pool.busy);
    }
#endif
    quant_rows(&J, 0, M);
    for (size_t i = 0; i < n_mm; i++) mm_item(&J, i);
    return 0;
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
    *v = (size_t)x;
    return 0;
}

static int arg_ptr(PyObject *o, void **p) {
    *p = PyLong_AsVoidPtr(o);
    return (*p == NULL && PyErr_Occurred()) ? -1 : 0;
}

PyDoc_STRVAR(matmul_doc,
             "matmul(fmt, x_ptr, w_ptr, out_ptr, M, K, N)\n--\n\n"
             "out[M, N] (float32) = x[M, K] (float32, row-major) @ W^T, W: N rows of K/32 blocks in\n"
             "format fmt (0 Q4_0, 1 Q4_1, 2 Q8_0), GGUF's bytes. Pointers are addresses (ints); K must be\n"
             "a multiple of 32. Nothing is checked about the memory behind them.");

static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "matmul(fmt, x_ptr, w_ptr, out_ptr, M, K, N) takes 7 arguments");
        return NULL;
    }
    long fmt = PyLong_AsLong(args[0]);
    if (fmt == -1 && PyErr_Occurred()) return NULL;
    if (fmt < 0 || fmt > 2) {
        PyErr_SetString(PyExc_ValueError, "fmt must be 0 (Q4_0), 1 (Q4_1) or 2 (Q8_0)");
        return NULL;
    }
    void *x, *w, *out;
    size_t M, K, N;
    if (arg_ptr(args[1], &x) || arg_ptr(args[2], &w) || arg_ptr(args[3], &out) || arg_size(args[4], &M, "M") ||
        arg_size(args[5], &K, "K") || arg_size(args[6], &N, "N")) {
        return NULL;
    }
    if (K % QK) {
        PyErr_Format(PyExc_ValueError, "K (%zu) must be a multiple of %d", K, QK);
        return NULL;
    }
    if (M == 0 || N == 0) Py_RETURN_NONE;
    if (!out || (K && (!x || !w))) {
        PyErr_SetString(PyExc_ValueError, "null pointer");
        return NULL;
    }
    if (M > (size_t)1 << 31 || N > (size_t)1 << 31 || K > (size_t)1 << 31 ||
        M * K > ((size_t)1 << 40)) {
        PyErr_SetString(PyExc_ValueError, "sizes too large");
        return NULL;
    }
    if (K == 0) {
        memset(out, 0, M * N * sizeof(float));
        Py_RETURN_NONE;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = qmm_compute((int)fmt, x, w, out, M, K, N);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "the number of threads must be in 1..1024");
        return NULL;
    }
#ifdef QMM_THREADS
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&g_pool.busy);
    g_threads = (int)n;
    if (n == 1) pool_stop(&g_pool); /* one thread: no pool at all */
    pthread_mutex_unlock(&g_pool.busy);
    Py_END_ALLOW_THREADS
#else
    g_threads = 1;
#endif
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(g_threads);
}

static PyObject *py_simd(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(g_simd ? "avx2" : "scalar");
}

static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (strcmp(name, "scalar") == 0) {
        g_simd = 0;
    } else if (strcmp(name, "avx2") == 0 && g_simd_available) {
        g_simd = 1;
    } else {
        PyErr_Format(PyExc_ValueError, "code path %R is not available here", arg);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_set_spin_us(PyObject *self, PyObject *arg) {
    (void)self;
    long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred()) return NULL;
    if (us < 0 || us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "spin time must be in 0..1000000 microseconds");
        return NULL;
    }
    g_spin_ns = us * 1000;
    Py_RETURN_NONE;
}

static PyMethodDef qmm_methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, matmul_doc},
    {"set_num_threads", py_set_num_threads, METH_O,
     "set_num_threads(n)\n--\n\nThreads per call, the caller included (n - 1 pool workers; 1: no pool)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads()\n--\n\nThreads per call."},
    {"simd", py_simd, METH_NOARGS, "simd()\n--\n\nThe code path in use: 'avx2' or 'scalar'."},
    {"set_simd", py_set_simd, METH_O,
     "set_simd(name)\n--\n\nUse code path 'avx2' (when the CPU has it) or 'scalar' (for tests)."},
    {"set_spin_us", py_set_spin_us, METH_O,
     "set_spin_us(us)\n--\n\nHow long idle pool workers spin before sleeping (default 50)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef qmm_module = {
    PyModuleDef_HEAD_INIT, "_qmm", "Matrix multiply for GGUF Q4_0 / Q4_1 / Q8_0 weights on CPU.", -1, qmm_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__qmm(void) {
    detect_simd();
    g_simd = g_simd_available;
#ifdef QMM_THREADS
    static int once = 0;
    if (!once) {
        if (pthread_key_create(&g_scratch_key, scratch_free) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_key_create failed");
            return NULL;
        }
        pthread_atfork(NULL, NULL, atfork_child);
        once = 1;
    }
#endif
    PyObject *m = PyModule_Create(&qmm_module);
#ifdef QMM_WITH_CPU_OPS
    if (m && PyModule_AddFunctions(m, qmm_cpu_ops_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
