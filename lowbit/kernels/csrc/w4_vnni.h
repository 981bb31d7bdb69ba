// The decode engine's fast 4-bit product for one token on CPUs with AVX-512 VNNI: 4-bit weight codes (the
// layout of weight_only_avx2.cpp) times the token's activations quantized to int8 in blocks of B columns,
// integer dot products (vpdpbusd: 32 code x activation products per instruction) summed exactly in int32 per
// block, then scaled in float32. This is what llama.cpp's Q4_0 x Q8_0 product does (blocks of 32 there); it is
// not the reference path's float product: the activations carry a rounding error of up to half a step,
// max|x_block| / 254, which lowbit_decode_step's callers choose (NativeLM(exact=False), the default) and the
// tests bound.
//
// Per row n and activation block b (columns [bB, bB + B) inside one weight group g):
//   y[n] += s[g, n] * xs[b] * (sum_k q[n, k] * xq[k] - z[n, g] * sum_k xq[k])
// the bracket exact in int32 (8 rows' sums reduced together), then one float32 multiply-add per row and block.
// with xq = round(x / xs[b]) in -127..127 and xs[b] = max|x| / 127 over the block. The code x activation sum
// is exact in int32; the zero-point term uses the block's activation sum, so the weight codes need no
// centering.
//
// Activation blocks are B = 32 columns, as llama.cpp's Q8_0 (SmolLM2-135M's int4-g64 format, teacher-forced:
// perplexity +0.38% over the float-activation path, benchmarks/decode_quality.py; +0.77% with blocks of 64 in
// an ad hoc run). Needs the group width g a multiple of 64 (each
// 32-byte row block of 64 columns then lies in one group).

#pragma once

#include <immintrin.h>
#include <stdint.h>

#include <cmath>

#include "weight_only_avx2.h"

#define LOWBIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace lowbit_wo {

inline bool have_vnni() {
    static const bool yes = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl");
    return yes;
}

// a token's activations in blocks of B columns: codes q (K rounded up to 64, zero padded), scale and code sum
// per block (B = 32 here)
struct XQ {
    int8_t* q;
    float* scale;
    int32_t* sum;
    int B;
};

// x (K floats) -> X (blocks of X.B columns)
LOWBIT_VNNI inline void quantize_blocks(const float* x, int K, XQ& X) {
    const int nb = (K + X.B - 1) / X.B;
    for (int b = 0; b < nb; ++b) {
        const int k0 = b * X.B, k1 = k0 + X.B < K ? k0 + X.B : K;
        __m512 amax = _mm512_setzero_ps();
        for (int k = k0; k < k1; k += 16)
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
        const float m = _mm512_reduce_max_ps(amax);
        const float s = m / 127.0f;
        const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
        __m512i sum = _mm512_setzero_si512();
        for (int k = k0; k < k1; k += 16) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv));  // nearest even
            sum = _mm512_add_epi32(sum, v);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(X.q + k), _mm512_cvtsepi32_epi8(v));
        }
        X.scale[b] = s;
        X.sum[b] = _mm512_reduce_add_epi32(sum);
    }
    for (int k = K; k % 64; ++k) X.q[k] = 0;
}

// the 8 rows' zero points of group gi (zt: (G, N) int8) as int32
LOWBIT_VNNI inline __m256i zeros8(const int8_t* zt, int gi, int N, int n0) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt + (size_t)gi * N + n0)));
}

// lane j = sum of the 8 lanes of v[j] (int32)
LOWBIT_VNNI inline __m256i reduce8_epi32(const __m256i v[8]) {
    const __m256i h0 = _mm256_hadd_epi32(v[0], v[1]), h1 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i h2 = _mm256_hadd_epi32(v[4], v[5]), h3 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i a = _mm256_hadd_epi32(h0, h1), b = _mm256_hadd_epi32(h2, h3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// y[n0 .. n0 + 8) = rows n0.. of the weight times X (+ bias). zt: the zero points transposed, int8 (G, N), so
// the 8 rows' zero points of a group are one load. The low and high nibbles of each 32-byte row block (columns
// 64j.. and 64j + 32..) meet two activation blocks, whose exact int32 sums are reduced over the 8 rows together
// and scaled apart.
LOWBIT_VNNI inline void rows8_w4_vnni(const W4& A, const int8_t* zt, int n0, const XQ& X, const float* bias,
                                        float* y) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const uint8_t* rows = A.w + (size_t)n0 * A.wstride;
    const int chunks = (A.K + 63) / 64, nb = (A.K + 31) / 32;
    __m256 out = _mm256_setzero_ps();
    for (int j = 0; j < chunks; ++j) {
        const int gi = j * 64 / A.g;
        const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X.q + j * 64));
        const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X.q + j * 64 + 32));
        __m256i lo[8], hi[8];
        for (int r = 0; r < 8; ++r) {
            const uint8_t* src = rows + (size_t)r * A.wstride + j * 32;
            _mm_prefetch(reinterpret_cast<const char*>(src + 8 * A.wstride), _MM_HINT_T0);  // the next tile
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
            lo[r] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(w, low), xlo);
            hi[r] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16(w, 4), low), xhi);
        }
        const __m256i z8 = zeros8(zt, gi, A.N, n0);
        const __m256 s8 = _mm256_loadu_ps(A.s + (size_t)gi * A.N + n0);
        const __m256i tl = _mm256_sub_epi32(reduce8_epi32(lo), _mm256_mullo_epi32(z8, _mm256_set1_epi32(X.sum[2 * j])));
        out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tl), _mm256_mul_ps(s8, _mm256_set1_ps(X.scale[2 * j])), out);
        if (2 * j + 1 < nb) {
            const __m256i th =
                _mm256_sub_epi32(reduce8_epi32(hi), _mm256_mullo_epi32(z8, _mm256_set1_epi32(X.sum[2 * j + 1])));
            out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(th), _mm256_mul_ps(s8, _mm256_set1_ps(X.scale[2 * j + 1])), out);
        }
    }
    if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + n0));
    _mm256_storeu_ps(y + n0, out);
}

// The same product for M tokens (prefill), with activation blocks of 64 columns (X[t].B == 64): each 64-column
// chunk of the 8 rows is unpacked into registers once and used by every token, whose partial sums go through one
// exact reduction per chunk and are added into y[t * ldy + n0 ..] (which holds the bias or 0 first). A prompt is
// bound by these reductions, not by reading the weights, so it takes blocks of 64 (one reduction per chunk) where
// a generated token takes 32 (two): on SmolLM2-135M, 128 tokens in 95-102 ms against 157-163 ms (ad hoc).
LOWBIT_VNNI inline void rows8_w4_vnni_tokens(const W4& A, const int8_t* zt, int n0, const XQ* X, int M,
                                             const float* bias, float* y, int ldy) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const uint8_t* rows = A.w + (size_t)n0 * A.wstride;
    const __m256 b8 = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
    for (int t = 0; t < M; ++t) _mm256_storeu_ps(y + (size_t)t * ldy + n0, b8);
    const int chunks = (A.K + 63) / 64;
    for (int j = 0; j < chunks; ++j) {
        const int gi = j * 64 / A.g;
        __m256i wlo[8], whi[8];
        for (int r = 0; r < 8; ++r) {
            const uint8_t* src = rows + (size_t)r * A.wstride + j * 32;
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
            wlo[r] = _mm256_and_si256(w, low);
            whi[r] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        }
        const __m256i z8 = zeros8(zt, gi, A.N, n0);
        const __m256 s8 = _mm256_loadu_ps(A.s + (size_t)gi * A.N + n0);
        for (int t = 0; t < M; ++t) {
            const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X[t].q + j * 64));
            const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X[t].q + j * 64 + 32));
            __m256i acc[8];
            for (int r = 0; r < 8; ++r)
                acc[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wlo[r], xlo), whi[r], xhi);
            const __m256i zx = _mm256_mullo_epi32(z8, _mm256_set1_epi32(X[t].sum[j]));
            const __m256 f = _mm256_mul_ps(s8, _mm256_set1_ps(X[t].scale[j]));
            float* yt = y + (size_t)t * ldy + n0;
            _mm256_storeu_ps(yt, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(reduce8_epi32(acc), zx)), f,
                                                 _mm256_loadu_ps(yt)));
        }
    }
}

}  // namespace lowbit_wo
