/*
 * Horizontal sum and max of the 8 floats of an __m256, for the AVX2 code of _qmm.c and _cpu_ops.c.
 * Include inside that code's x86 block, after <immintrin.h> and the file's AVX2_INLINE.
 */
#ifndef FLEETLM_AVX2_REDUCE_H
#define FLEETLM_AVX2_REDUCE_H

AVX2_INLINE float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

AVX2_INLINE float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

#endif /* FLEETLM_AVX2_REDUCE_H */
