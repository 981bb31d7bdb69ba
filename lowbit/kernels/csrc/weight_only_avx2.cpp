// Weight-only linears on AVX2: packed 4-bit (and 8-bit) weight codes x float32 activations, in float32.
//
// Built and loaded with w4a8_avx2.cpp by lowbit/native.py (same library, plain C ABI, ctypes; OpenMP on
// the runtime torch loaded, torch's thread count).
//
// The weight is the layout of lowbit.kernels.w4a8_avx2.pack_codes (shared by every 4-bit kernel here):
//   w  uint8 (N, KB * 32)  codes q in 0..15, two per byte: 32-column chunk c of a row lies in the 32 bytes at
//                          (c / 2) * 32, in the low nibbles when c is even, the high ones when odd
//   z  int8  (N, G)        zero point per row and group
//   s  float (G, N)        scale per group and row
// with groups of g columns (the last one K - (G - 1) * g), g and the last width multiples of 32, N a multiple
// of 8, K a multiple of 32. The weight is w[n, k] = (q[n, k] - z[n, g(k)]) * s[g(k), n].
//
// lowbit_w4_linear_f32: y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] * (q[n, k] - z[n, g]) (+ bias[n]), every
// product and sum in float32 (q - z is an exact small integer): the reference path's value up to float32
// rounding order. Tiles of 8 rows x 1 token. One token: the codes are unpacked in registers and each group's
// sum scaled once. Several tokens: each block of 8 rows is first unpacked to float32 weights (scales applied) in
// a per-thread buffer, then every token reads it. Meant for few tokens (decode); many tokens are faster as
// lowbit_w4_dequant into a float32 weight and a float matrix product.
//
// lowbit_w4_dequant: rows [n0, n1) of the float32 weight, in parallel (a float product over many tokens takes the
// weight a slice of rows at a time, so the float copy stays small).
//
// lowbit_s8_linear_f32: the same product for 8-bit per-channel codes (signed c, offset o, scale s as below):
// y[m, n] = s[n] * sum_k x[m, k] * (c[n, k] + o[n]) (+ bias[n]), in float32 (c + o exact in integers); any N, K a
// multiple of 8. Tiles of 8 rows (a last partial tile row by row) x 1 token.
//
// lowbit_s8_dequant: the float32 weight (N, K) of 8-bit per-channel codes: w[n, k] = (c[n, k] + o[n]) * s[n] with
// signed codes c (int8), offset o (int32, 128 - zero point; null for none) and scale s (float32), as
// lowbit.kernels.int8 stores them.
//
// Threads: torch's count, for calls of at least kParallelWork multiply-adds (or weights); smaller ones run on the
// calling thread (see w4a8_avx2.cpp).

#include "weight_only_avx2.h"
#include "weight_only_avx512.h"

#include <immintrin.h>
#include <stdint.h>
#include <cstdlib>
#include <omp.h>

// the work below which a call runs on the calling thread alone (defined in w4a8_avx2.cpp)
extern size_t kParallelWork;

using namespace lowbit_wo;

// y (M, N) = x (M, K) @ weight.T (+ bias); see the header. Returns 1 (shapes) or 2 (memory).
extern "C" int lowbit_w4_linear_f32(const float* x, const uint8_t* w, const int8_t* z, const float* s,
                                    const float* bias, float* y, int M, int N, int K, int g, int threads) {
    W4 A{w, z, s, N, K, g, 0, 0};
    if (M < 0 || check(A)) return 1;
    const int blocks = N / 8, nt = threads > 0 ? threads : 1;
    float* bufs = nullptr;
    if (M > 1) {  // several tokens: each block of 8 rows unpacked to float32 once, reused by every token
        bufs = static_cast<float*>(std::aligned_alloc(64, (size_t)nt * 8 * K * sizeof(float)));
        if (!bufs) return 2;
    }
#pragma omp parallel for schedule(dynamic, 2) num_threads(nt) if ((size_t)M * N * K >= kParallelWork)
    for (int b = 0; b < blocks; ++b) {
        if (M == 1) {
            rows8_packed_best(A, b * 8, x, bias, y);
        } else {
            float* buf = bufs + (size_t)omp_get_thread_num() * 8 * K;
            for (int r = 0; r < 8; ++r) dequant_row(A, b * 8 + r, buf + (size_t)r * K);
            for (int m = 0; m < M; ++m) rows8_float(K, buf, x + (size_t)m * K, bias, y + (size_t)m * N, b * 8);
        }
    }
    std::free(bufs);
    return 0;
}

// out (n1 - n0, K) float32 = rows [n0, n1) of the weight; see the header. Returns 1 (shapes).
extern "C" int lowbit_w4_dequant(const uint8_t* w, const int8_t* z, const float* s, float* out, int N, int K, int g,
                                 int n0, int n1, int threads) {
    W4 A{w, z, s, N, K, g, 0, 0};
    if (check(A) || n0 < 0 || n1 > N || n0 > n1) return 1;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) \
    if ((size_t)(n1 - n0) * K >= kParallelWork)
    for (int n = n0; n < n1; ++n) dequant_row(A, n, out + (size_t)(n - n0) * K);
    return 0;
}

// out (N, K) float32 = (c + o) * s per row; see the header. Returns 1 (shapes).
extern "C" int lowbit_s8_dequant(const int8_t* c, const float* s, const int32_t* o, float* out, int N, int K,
                                 int threads) {
    if (N < 0 || K <= 0) return 1;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if ((size_t)N * K >= kParallelWork)
    for (int n = 0; n < N; ++n) {
        const int8_t* src = c + (size_t)n * K;
        float* dst = out + (size_t)n * K;
        const __m256i off = _mm256_set1_epi32(o ? o[n] : 0);
        const __m256 sc = _mm256_set1_ps(s[n]);
        int k = 0;
        for (; k + 8 <= K; k += 8) {
            const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k)));
            _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(v, off)), sc));
        }
        for (; k < K; ++k) dst[k] = (float)(src[k] + (o ? o[n] : 0)) * s[n];
    }
    return 0;
}


// y (M, N) = x (M, K) @ ((c + o) * s).T (+ bias); see the header. Returns 1 (shapes).
extern "C" int lowbit_s8_linear_f32(const float* x, const int8_t* c, const float* s, const int32_t* o,
                                    const float* bias, float* y, int M, int N, int K, int threads) {
    if (M < 0 || N < 0 || K <= 0 || K % 8) return 1;
    const int blocks = (N + 7) / 8;
#pragma omp parallel for schedule(dynamic, 2) num_threads(threads > 0 ? threads : 1) \
    if ((size_t)M * N * K >= kParallelWork)
    for (int b = 0; b < blocks; ++b) {
        const int n0 = b * 8, rows = N - n0 < 8 ? N - n0 : 8;
        for (int m = 0; m < M; ++m) s8_rows(x + (size_t)m * K, c, s, o, bias, y + (size_t)m * N, n0, rows, K);
    }
    return 0;
}
