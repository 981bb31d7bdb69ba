// AVX-512 single-token tile of the 4-bit weight-only product (the layout of weight_only_avx2.cpp), used in
// place of lowbit_wo::rows8_packed where the CPU has AVX-512F (checked at run time; the library is built for
// AVX2, these functions carry their own target attribute).
//
// Each weight is looked up, not converted: per row and group, a 16-float table holds (q - z) * s for q = 0..15
// (one rounding, as lowbit dequantizes), and vpermps picks each weight's entry by its nibble (it reads the low
// four bits of each 32-bit index, so the low nibble needs no mask). A 32-column chunk then costs two byte
// loads widened to 16 x 32 bits, at most two shifts, two lookups and two FMAs against x; eight rows share
// each load of x. The sum of w[n, k] * x[k] is the reference path's up to float32 summation order.

#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "weight_only_avx2.h"

namespace lowbit_wo {

__attribute__((target("avx512f"))) inline void rows8_packed_avx512(const W4& A, int n0, const float* x,
                                                                   const float* bias, float* y) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[8], table[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* rows = A.w + (size_t)n0 * A.wstride;
    const int chunks = A.K / 32;
    int gi = -1;
    for (int c = 0; c < chunks; ++c) {
        const int g_here = (c * 32) / A.g < A.G ? (c * 32) / A.g : A.G - 1;
        if (g_here != gi) {
            gi = g_here;
            for (int r = 0; r < 8; ++r) {
                const __m512 z = _mm512_set1_ps((float)A.z[(n0 + r) * A.G + gi]);
                table[r] = _mm512_mul_ps(_mm512_sub_ps(iota, z), _mm512_set1_ps(A.s[(size_t)gi * A.N + n0 + r]));
            }
        }
        const __m512 x0 = _mm512_loadu_ps(x + c * 32), x1 = _mm512_loadu_ps(x + c * 32 + 16);
        const int off = (c >> 1) * 32, shift = (c & 1) * 4;
        for (int r = 0; r < 8; ++r) {
            const uint8_t* p = rows + (size_t)r * A.wstride + off;
            __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
            __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
            if (shift) {
                i0 = _mm512_srli_epi32(i0, 4);
                i1 = _mm512_srli_epi32(i1, 4);
            }
            acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(i0, table[r]), x0, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(i1, table[r]), x1, acc[r]);
        }
    }
    for (int r = 0; r < 8; ++r) y[n0 + r] = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[n0 + r] : 0.0f);
}

inline bool have_avx512() {
    static const bool yes = __builtin_cpu_supports("avx512f");
    return yes;
}

// y[n0 .. n0 + 8) for one token: the AVX-512 tile where the CPU has it, else the AVX2 one
inline void rows8_packed_best(const W4& A, int n0, const float* x, const float* bias, float* y) {
    if (have_avx512())
        rows8_packed_avx512(A, n0, x, bias, y);
    else
        rows8_packed(A, n0, x, bias, y);
}

}  // namespace lowbit_wo
