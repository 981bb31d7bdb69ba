// The AVX2 weight-only building blocks shared by weight_only_avx2.cpp (one linear per call) and decode_step.cpp
// (a whole decode step per call): the 4-bit and 8-bit layouts and their tiles of 8 output rows. See
// weight_only_avx2.cpp for the layouts.

#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace lowbit_wo {

struct W4 {
    const uint8_t* w; const int8_t* z; const float* s;
    int N, K, g, G, wstride;
};

inline int check(W4& A) {
    if (A.N % 8 || A.K % 32 || A.K <= 0 || A.g % 32 || A.g <= 0) return 1;
    A.G = (A.K + A.g - 1) / A.g;
    if ((A.K - (A.G - 1) * A.g) % 32) return 1;
    A.wstride = ((A.K + 63) / 64) * 32;
    return 0;
}

// q - z of chunk c (32 columns) of a row, as 32 signed bytes
inline __m256i signed_chunk(const uint8_t* row, int c, __m256i z) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (c >> 1) * 32));
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i q = (c & 1) ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), low) : _mm256_and_si256(raw, low);
    return _mm256_sub_epi8(q, z);
}

// acc += x[0..32) * v (32 signed bytes), in four float32 FMAs
inline __m256 fma32(__m256 acc, __m256i v, const __m256 xv[4]) {
    const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), xv[0], acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), xv[1], acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), xv[2], acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), xv[3], acc);
    return acc;
}

// lane j of the result = sum of the 8 lanes of v[j]
inline __m256 reduce8(const __m256 v[8]) {
    const __m256 h0 = _mm256_hadd_ps(v[0], v[1]), h1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h2 = _mm256_hadd_ps(v[4], v[5]), h3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 a = _mm256_hadd_ps(h0, h1), b = _mm256_hadd_ps(h2, h3);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// row n of the weight as float32 (K values at `dst`): (q - z) * s, one rounding, as lowbit dequantizes
inline void dequant_row(const W4& A, int n, float* dst) {
    const uint8_t* src = A.w + (size_t)n * A.wstride;
    for (int gi = 0; gi < A.G; ++gi) {
        const __m256i z = _mm256_set1_epi8(A.z[n * A.G + gi]);
        const __m256 sc = _mm256_set1_ps(A.s[(size_t)gi * A.N + n]);
        const int c_end = (gi == A.G - 1 ? A.K : (gi + 1) * A.g) / 32;
        for (int c = gi * A.g / 32; c < c_end; ++c) {
            const __m256i v = signed_chunk(src, c, z);
            const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int j = 0; j < 4; ++j)
                _mm256_storeu_ps(dst + c * 32 + 8 * j,
                                 _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[j])), sc));
        }
    }
}

// one token: y[n0 .. n0 + 8) from the nibbles, unpacked in registers, scaled once per group
inline void rows8_packed(const W4& A, int n0, const float* x, const float* bias, float* y) {
    __m256 out = _mm256_setzero_ps();
    for (int gi = 0; gi < A.G; ++gi) {
        const int c_begin = gi * A.g / 32;
        const int c_end = (gi == A.G - 1 ? A.K : (gi + 1) * A.g) / 32;
        __m256i zr[8];
        for (int r = 0; r < 8; ++r) zr[r] = _mm256_set1_epi8(A.z[(n0 + r) * A.G + gi]);
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int c = c_begin; c < c_end; ++c) {
            __m256 xv[4];
            for (int j = 0; j < 4; ++j) xv[j] = _mm256_loadu_ps(x + c * 32 + 8 * j);
            for (int r = 0; r < 8; ++r)
                acc[r] = fma32(acc[r], signed_chunk(A.w + (size_t)(n0 + r) * A.wstride, c, zr[r]), xv);
        }
        out = _mm256_fmadd_ps(reduce8(acc), _mm256_loadu_ps(A.s + (size_t)gi * A.N + n0), out);
    }
    if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + n0));
    _mm256_storeu_ps(y + n0, out);
}

// one token: y[n0 .. n0 + 8) from the rows' float32 weights `wf` (8, K) (dequant_row)
inline void rows8_float(int K, const float* wf, const float* x, const float* bias, float* y, int n0) {
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wf + (size_t)r * K + k), xv, acc[r]);
    }
    __m256 out = reduce8(acc);
    if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + n0));
    _mm256_storeu_ps(y + n0, out);
}


// sum of the 8 lanes
inline float hsum(__m256 v) {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// 8 codes c + o as floats (the integer sum is exact, so each weight is one rounding from lowbit's (q - zp) * s)
inline __m256 codes_ps(const int8_t* p, __m256i off) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(v, off));
}

// rows [n0, n0 + rows) of y for token row xr
inline void s8_rows(const float* xr, const int8_t* c, const float* s, const int32_t* o, const float* bias, float* yr,
             int n0, int rows, int K) {
    if (rows == 8) {
        __m256 acc[8];
        __m256i off[8];
        for (int r = 0; r < 8; ++r) {
            acc[r] = _mm256_setzero_ps();
            off[r] = _mm256_set1_epi32(o ? o[n0 + r] : 0);
        }
        for (int k = 0; k < K; k += 8) {
            const __m256 xv = _mm256_loadu_ps(xr + k);
            for (int r = 0; r < 8; ++r)
                acc[r] = _mm256_fmadd_ps(codes_ps(c + (size_t)(n0 + r) * K + k, off[r]), xv, acc[r]);
        }
        __m256 out = _mm256_mul_ps(reduce8(acc), _mm256_loadu_ps(s + n0));
        if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + n0));
        _mm256_storeu_ps(yr + n0, out);
        return;
    }
    for (int r = 0; r < rows; ++r) {
        const int n = n0 + r;
        const __m256i off = _mm256_set1_epi32(o ? o[n] : 0);
        __m256 acc = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8)
            acc = _mm256_fmadd_ps(codes_ps(c + (size_t)n * K + k, off), _mm256_loadu_ps(xr + k), acc);
        yr[n] = hsum(acc) * s[n] + (bias ? bias[n] : 0.0f);
    }
}

}  // namespace lowbit_wo
