// What decode_step.cpp (one token) and prefill.cpp (a prompt) share: the model structs Python fills
// (lowbit/runtime/native_lm.py) and the small float operations of a Llama-family layer.

#pragma once

#include <immintrin.h>
#include <stdint.h>

#include <cmath>

#include "weight_only_avx2.h"

extern "C" {

struct LbLinear {
    int32_t kind, n, rows, k, group;
    const void* w;
    const void* z;  // kind 1: int8 zero points (rows, groups)
    const int8_t* zt;  // kind 1: the same transposed (groups, rows), for the integer tile
    const float* s;  // kind 1: (groups, rows); kind 2: (n,)
    const int32_t* o;  // kind 2: offsets (n,) or null
    const float* bias;  // (n,) or null (kind 1: (rows,), zero padded)
    const float* in_scale;  // (k,) or null
};

struct LbLayer {
    const float* attn_norm;
    const float* mlp_norm;
    const float* q_norm;  // (head_dim,) or null
    const float* k_norm;
    LbLinear q, k, v, o, gate, up, down;
};

struct LbModel {
    int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, max_len, max_rows;
    int32_t exact;  // 1: float32 activations everywhere; 0: int8 activation blocks for 4-bit products (w4_vnni.h)
    float eps, attn_scale;
    const LbLayer* layers;
    const float* final_norm;
    LbLinear head;
    const float* rope_cos;  // (max_len, head_dim)
    const float* rope_sin;
    float* k_cache;  // (n_layers, n_kv, max_len, head_dim)
    float* v_cache;
};

}  // extern "C"

namespace lowbit_lm {

using namespace lowbit_wo;

inline int pad8(int n) { return (n + 7) / 8 * 8; }

// a 4-bit linear (kind 1) as the tiles take it; check() fills its group count and row stride (0 when the shapes fit)
inline W4 w4_of(const LbLinear& L, int* bad = nullptr) {
    W4 A{static_cast<const uint8_t*>(L.w), static_cast<const int8_t*>(L.z), L.s, L.rows, L.k, L.group, 0, 0};
    const int rc = check(A);
    if (bad) *bad = rc;
    return A;
}

// whether a linear can run on the integer tile of w4_vnni.h (the CPU aside): 4-bit codes with their zero points
// transposed, groups of a multiple of 64 columns
inline bool vnni_linear(const LbLinear& L) { return L.kind == 1 && L.zt && L.group % 64 == 0; }

inline float dot(const float* a, const float* b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// scores s[t] = scale * q . k_t for t < T: keys rows of `hd` floats; eight keys per tile
inline void scores(const float* q, const float* keys, int T, int hd, float scale, float* s) {
    int t = 0;
    for (; t + 8 <= T; t += 8) rows8_float(hd, keys + (size_t)t * hd, q, nullptr, s, t);
    for (; t < T; ++t) s[t] = dot(q, keys + (size_t)t * hd, hd);
    for (t = 0; t < T; ++t) s[t] *= scale;
}

// out = sum_t p[t] v_t (rows of hd floats, hd a multiple of 8), 64 output columns at a time in registers
inline void weighted_sum(const float* p, const float* v, int T, int hd, float* out) {
    for (int d0 = 0; d0 < hd; d0 += 64) {
        const int w = (hd - d0 < 64 ? hd - d0 : 64) / 8;
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int t = 0; t < T; ++t) {
            const __m256 pt = _mm256_set1_ps(p[t]);
            const float* row = v + (size_t)t * hd + d0;
            for (int j = 0; j < w; ++j) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row + 8 * j), acc[j]);
        }
        for (int j = 0; j < w; ++j) _mm256_storeu_ps(out + d0 + 8 * j, acc[j]);
    }
}

// out = x / sqrt(mean(x^2) + eps) * w, as the models' RMSNorm (float32)
inline void rmsnorm(const float* x, const float* w, float eps, float* out, int n) {
    const float ms = dot(x, x, n) / (float)n;
    const float r = 1.0f / std::sqrt(ms + eps);
    for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// the rotate-half rotary embedding of one head in place: x * cos + rotate_half(x) * sin
inline void rope(float* x, const float* cos, const float* sin, int d) {
    const int h = d / 2;
    for (int i = 0; i < h; ++i) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

// e^x of 8 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial, 2^n from the
// exponent bits), relative error about 1e-7; inputs clamped to +-88.376 (the float range)
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// s[0..T) = softmax(s) in place
inline void softmax(float* s, int T) {
    float mx = -INFINITY;
    for (int t = 0; t < T; ++t) mx = s[t] > mx ? s[t] : mx;
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= T; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; t < T; ++t) sum += (s[t] = std::exp(s[t] - mx));
    const float inv = 1.0f / sum;
    for (t = 0; t < T; ++t) s[t] *= inv;
}

// g[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u for i in [i0, i1)
inline void silu_mul(float* g, const float* u, int i0, int i1) {
    int i = i0;
    for (; i + 8 <= i1; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, d), _mm256_loadu_ps(u + i)));
    }
    for (; i < i1; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace lowbit_lm
