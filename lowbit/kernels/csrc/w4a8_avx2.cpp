// W4A8 on AVX2: 4-bit weight codes x 8-bit activation codes, summed exactly in integers, scaled per group.
//
// Built and loaded by lowbit/native.py (g++ -O3 -fopenmp, plain C ABI, called through ctypes; the
// OpenMP runtime is the one torch already loaded, so torch.set_num_threads and this kernel share one pool).
//
// Inputs (all row-major, contiguous):
//   x  uint8 (M, xk)       activation codes a + 128 (a: signed int8 codes of the token, so x in 0..255);
//                          xk = K, or a divisor of K that is a multiple of g: each group then reads x from
//                          column (group start mod xk) (W8A8's two nibble groups both read all of x)
//   w  uint8 (N, KB * 32)  weight codes q in 0..15, two per byte: 32-column chunk c of a row lies in the
//                          32 bytes at (c / 2) * 32, in the low nibbles when c is even, the high ones when odd
//                          (KB = ceil(K / 64) blocks of 64 columns; a last odd chunk leaves high nibbles 0)
//   z  int8  (N, G)        zero point per row and group (8 for symmetric codes)
//   s  float (G, N)        scale per group and row (stored by group, so a tile's rows lie side by side)
//   corr int32 (G, N)      128 * sum_{k in group} (q_k - z): the share of the +128 in x, subtracted exactly
//   y  float (M, N)        out: y[m, n] = sum_g s[n, g] * sum_{k in g} a[m, k] * (q[n, k] - z[n, g])
// Groups are `g` columns wide (the last one K - (G - 1) * g); g and the last width are multiples of 32.
// N must be a multiple of 8, K a multiple of 32.
//
// Exactness: vpmaddubsw multiplies unsigned x (0..255) by signed q - z (-15..15) and adds neighbouring
// pairs into int16: |2 * 255 * 15| = 7650, and four such chunks add up to at most 30600 < 32767, so the int16
// sums never saturate when flushed to int32 every 4 chunks (128 columns). Each group's integer sum is exact;
// only the float scaling and the sum over groups round.
//
// Tiles: R rows x T tokens with R * T = 8, so that the 8 int32 sums of a tile end in the 8 lanes of one
// register (a transposing horizontal add): (2 x 4) for batches, (8 x 1) for one token (decode). With several
// tokens, each block of 8 rows is first unpacked to signed bytes (8 * K, per thread) and reused by every token.
//
// Threads: blocks of 8 rows are handed out dynamically (4 at a time), so a thread slowed by another process
// on its core takes fewer blocks (measured on 2 cores with one busy: 40 ms instead of 48 ms at 128 x 4096 x
// 4096). The thread count is torch's (torch.set_num_threads), for products of at least kParallelWork
// multiply-adds; smaller ones run on the calling thread.

#include <immintrin.h>
#include <stdint.h>
#include <cstdlib>
#include <omp.h>

namespace {

}  // namespace

// Work (multiply-adds, or weights unpacked) below which a call of any of lowbit's kernels runs on the calling
// thread alone: waking a second thread costs microseconds on an idle machine, more than a tiny product gains.
// lowbit_set_parallel_work changes it (lowbit.native.set_parallel_work).
size_t kParallelWork = size_t(1) << 16;

namespace {

// lane j of the result = sum of the 8 lanes of v[j]
inline __m256i reduce8(const __m256i v[8]) {
    __m256i h0 = _mm256_hadd_epi32(v[0], v[1]);
    __m256i h1 = _mm256_hadd_epi32(v[2], v[3]);
    __m256i h2 = _mm256_hadd_epi32(v[4], v[5]);
    __m256i h3 = _mm256_hadd_epi32(v[6], v[7]);
    __m256i a = _mm256_hadd_epi32(h0, h1);  // 128-bit halves: [v0..v3 low sums | v0..v3 high sums]
    __m256i b = _mm256_hadd_epi32(h2, h3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// lane r * T + t = v[r] (r < R): each of the R consecutive values repeated T times, built without a gather
template <int R, int T>
inline __m256i lanes(const int32_t* v) {
    if constexpr (R == 8) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
    } else if constexpr (R == 4) {
        const __m256i four = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
        return _mm256_permutevar8x32_epi32(four, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    } else {
        static_assert(R == 2, "tiles have 2, 4 or 8 rows");
        return _mm256_setr_m128i(_mm_set1_epi32(v[0]), _mm_set1_epi32(v[1]));
    }
}

struct Args {
    const uint8_t* x; const uint8_t* w; const int8_t* z; const float* s; const int32_t* corr; float* y;
    int M, N, K, g, G, wstride;
    int xk;  // columns of x: K, or K / 2 when every group reads x from its start again (W8A8's two nibbles)
};

// the signed weights q - z of rows [n0, n0 + 8), one byte each: (8, K) at `out` (batches reuse them per token)
void unpack_rows(const Args& A, int n0, int8_t* out) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < 8; ++r) {
        const uint8_t* src = A.w + (size_t)(n0 + r) * A.wstride;
        int8_t* dst = out + (size_t)r * A.K;
        for (int c = 0; c < A.K / 32; ++c) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (c >> 1) * 32));
            const __m256i q = (c & 1) ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), low) : _mm256_and_si256(raw, low);
            const __m256i z = _mm256_set1_epi8(A.z[(n0 + r) * A.G + c * 32 / A.g]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * 32), _mm256_sub_epi8(q, z));
        }
    }
}

// the signed weights q - z of chunk c (32 columns) of a row, from its nibbles
inline __m256i nibbles(const uint8_t* row, int c, __m256i z) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (c >> 1) * 32));
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i q = (c & 1) ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), low) : _mm256_and_si256(raw, low);
    return _mm256_sub_epi8(q, z);
}

// One tile: rows n0 + r (r < R) x tokens m0 + t (t < T). With Unpacked, the signed weights come from `wu`
// (rows of K bytes from unpack_rows, `wu` at row n0); otherwise they are unpacked here from the nibbles.
template <int R, int T, bool Unpacked>
void tile(const Args& A, int n0, int m0, const int8_t* wu) {
    static_assert(R * T == 8, "a tile fills one register of 8 sums");
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t* xt[T];
    for (int t = 0; t < T; ++t) xt[t] = A.x + (size_t)(m0 + t) * A.xk;
    const uint8_t* wp[R];
    const int8_t* wq[R];
    for (int r = 0; r < R; ++r) {
        wp[r] = A.w + (size_t)(n0 + r) * A.wstride;
        wq[r] = Unpacked ? wu + (size_t)r * A.K : nullptr;
    }
    __m256 out = _mm256_setzero_ps();  // lane r * T + t: row n0 + r, token m0 + t
    for (int gi = 0; gi < A.G; ++gi) {
        const int c_begin = gi * A.g / 32;
        const int c_end = (gi == A.G - 1 ? A.K : (gi + 1) * A.g) / 32;
        const int xoff = (c_begin * 32) % A.xk - c_begin * 32;  // x column of weight column k: k + xoff
        __m256i zr[R];
        if (!Unpacked)
            for (int r = 0; r < R; ++r) zr[r] = _mm256_set1_epi8(A.z[(n0 + r) * A.G + gi]);
        __m256i isum = _mm256_setzero_si256();
        for (int c0 = c_begin; c0 < c_end; c0 += 4) {
            const int c1 = c0 + 4 < c_end ? c0 + 4 : c_end;
            __m256i acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int c = c0; c < c1; ++c) {
                __m256i wv[R];
                for (int r = 0; r < R; ++r)
                    wv[r] = Unpacked ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq[r] + c * 32))
                                     : nibbles(wp[r], c, zr[r]);
                for (int t = 0; t < T; ++t) {
                    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt[t] + xoff + c * 32));
                    for (int r = 0; r < R; ++r)
                        acc[r * T + t] = _mm256_add_epi16(acc[r * T + t], _mm256_maddubs_epi16(xv, wv[r]));
                }
            }
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_madd_epi16(acc[j], ones);
            isum = _mm256_add_epi32(isum, reduce8(acc));
        }
        const size_t at = (size_t)gi * A.N + n0;  // scales and corrections are stored (G, N): rows side by side
        isum = _mm256_sub_epi32(isum, lanes<R, T>(A.corr + at));
        const __m256 scale = _mm256_castsi256_ps(lanes<R, T>(reinterpret_cast<const int32_t*>(A.s + at)));
        out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, out);
    }
    alignas(32) float o[8];
    _mm256_store_ps(o, out);
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) A.y[(size_t)(m0 + t) * A.N + n0 + r] = o[r * T + t];
}

// rows [n0, n0 + 8) for every token: (2 x 4) tiles, then the remaining tokens with (4 x 2) and (8 x 1); with
// several tokens the rows' signed weights are unpacked once into `buf` (8 * K bytes)
void row_block(const Args& A, int n0, int8_t* buf) {
    if (A.M == 1) {
        tile<8, 1, false>(A, n0, 0, nullptr);
        return;
    }
    unpack_rows(A, n0, buf);
    int m = 0;
    for (; m + 4 <= A.M; m += 4)
        for (int r = 0; r < 8; r += 2) tile<2, 4, true>(A, n0 + r, m, buf + (size_t)r * A.K);
    for (; m + 2 <= A.M; m += 2)
        for (int r = 0; r < 8; r += 4) tile<4, 2, true>(A, n0 + r, m, buf + (size_t)r * A.K);
    for (; m < A.M; ++m) tile<8, 1, true>(A, n0, m, buf);
}

}  // namespace

namespace {

// the product into y (M, N); x has A.xk columns
int product(Args& A, int threads) {
    const int blocks = A.N / 8;
    int8_t* bufs = nullptr;
    if (A.M > 1) {
        bufs = static_cast<int8_t*>(std::aligned_alloc(64, (size_t)(threads > 0 ? threads : 1) * 8 * A.K));
        if (!bufs) return 2;
    }
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads > 0 ? threads : 1) \
    if ((size_t)A.M * A.N * A.K >= kParallelWork)
    for (int b = 0; b < blocks; ++b)
        row_block(A, b * 8, bufs ? bufs + (size_t)omp_get_thread_num() * 8 * A.K : nullptr);
    std::free(bufs);
    return 0;
}

// 0 when the shapes fit the kernel (see the header), else 1; sets A's derived fields
int check(Args& A) {
    if (A.M < 0 || A.N % 8 || A.K % 32 || A.g % 32 || A.g <= 0 || A.xk <= 0 || A.xk % 32) return 1;
    A.G = (A.K + A.g - 1) / A.g;
    if ((A.K - (A.G - 1) * A.g) % 32) return 1;
    if (A.xk != A.K && (A.xk % A.g || A.K % A.xk)) return 1;  // a group never wraps around x's columns
    A.wstride = ((A.K + 63) / 64) * 32;
    return 0;
}

}  // namespace

// x (M, xk) with xk = K (or K / 2: each group of K / 2 columns reads x from its start); see the header
extern "C" int lowbit_w4a8_avx2(const uint8_t* x, const uint8_t* w, const int8_t* z, const float* s,
                                const int32_t* corr, float* y, int M, int N, int K, int xk, int g, int threads) {
    Args A{x, w, z, s, corr, y, M, N, K, g, 0, 0, xk};
    if (check(A)) return 1;
    return product(A, threads);
}

namespace {

// Symmetric 8-bit codes of one row of K floats, as lowbit's quantizer makes them for an int8 per-token spec
// with fp16 (half = 1) or fp32 (half = 0) scales: amax = max |x|, raw = amax / 127 clamped to the scale
// format's [smallest normal, max], rounded to the format (nearest, one step up where that fell below the raw
// value), codes = round_half_even(x / scale) clamped to -128..127, written as codes + 128 (uint8, what the
// product reads). Returns false (and writes nothing) when the row holds NaN or Inf.
bool quantize_row(const float* row, uint8_t* out, float* scale_out, int K, int half) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 inf = _mm256_set1_ps(__builtin_inff());
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k));
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or +-Inf
        vmax = _mm256_max_ps(vmax, a);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float amax = 0.0f;
    for (int j = 0; j < 8; ++j) amax = lanes[j] > amax ? lanes[j] : amax;
    bool bad = _mm256_movemask_ps(vbad) != 0;
    for (; k < K; ++k) {
        const float a = __builtin_fabsf(row[k]);
        bad |= !(a < __builtin_inff());
        amax = a > amax ? a : amax;
    }
    if (bad) return false;
    float scale = amax / 127.0f;
    if (half) {
        const float c = scale < 6.103515625e-05f ? 6.103515625e-05f : (scale > 65504.0f ? 65504.0f : scale);
        uint16_t h = _cvtss_sh(c, _MM_FROUND_TO_NEAREST_INT);
        if (_cvtsh_ss(h) < c) h += 1;  // positive and below max: the next fp16 up
        scale = _cvtsh_ss(h);
    } else {
        const float tiny = 1.17549435e-38f;
        scale = scale < tiny ? tiny : scale;
    }
    *scale_out = scale;
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
            __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + k + 8 * j), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
        }
        // int32 -> int16 -> int8 with saturation (values already in range); packs interleave 128-bit lanes
        const __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i b = _mm256_packs_epi16(w01, w23);
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        b = _mm256_xor_si256(b, _mm256_set1_epi8((char)0x80));  // + 128
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), b);
    }
    for (; k < K; ++k) {
        float v = __builtin_nearbyintf(row[k] / scale);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        out[k] = (uint8_t)((int)v + 128);
    }
    return true;
}

// every row of x (M, K) through quantize_row; false when any row holds NaN or Inf
bool quantize_rows(const float* x, uint8_t* codes, float* scales, int M, int K, int half, int threads) {
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) reduction(| : bad) \
    if (M >= 8 && (size_t)M * K >= kParallelWork / 8)
    for (int m = 0; m < M; ++m)
        bad |= !quantize_row(x + (size_t)m * K, codes + (size_t)m * K, scales + m, K, half);
    return !bad;
}

}  // namespace

// codes + 128 and scales of each row of x (M, K): quantize_row; returns 3 when a row holds NaN or Inf
extern "C" int lowbit_quantize_rows_s8(const float* x, uint8_t* codes, float* scales, int M, int K, int half,
                                       int threads) {
    return quantize_rows(x, codes, scales, M, K, half, threads) ? 0 : 3;
}

// A whole W4A8 linear for symmetric int8 per-token activations, in one call: x (M, xk) float32 quantized by
// quantize_row into `codes` (M, xk) and `scales` (M) (scratch; allocated here when null), the product, then
// y = y * scale[m] + bias[n] (bias may be null). xk = K, or K / 2 for W8A8's two nibbles. Returns 1 (shapes), 2 (memory) or 3 (NaN/Inf).
extern "C" int lowbit_w4a8_linear_s8(const float* x, uint8_t* codes, float* scales, const uint8_t* w,
                                     const int8_t* z, const float* s, const int32_t* corr, const float* bias,
                                     float* y, int M, int N, int K, int xk, int g, int half, int threads) {
    uint8_t* own = nullptr;  // scratch allocated here when the caller passes none
    if (!codes || !scales) {
        own = static_cast<uint8_t*>(std::malloc((size_t)M * xk + (size_t)M * sizeof(float) + 64));
        if (!own) return 2;
        scales = reinterpret_cast<float*>(own);
        codes = own + (size_t)M * sizeof(float);
    }
    Args A{codes, w, z, s, corr, y, M, N, K, g, 0, 0, xk};
    int rc = check(A);
    if (!rc && !quantize_rows(x, codes, scales, M, xk, half, threads)) rc = 3;
    if (!rc) rc = product(A, threads);
    if (rc) {
        std::free(own);
        return rc;
    }
    for (int m = 0; m < M; ++m) {
        float* row = y + (size_t)m * N;
        const __m256 t = _mm256_set1_ps(scales[m]);
        for (int n = 0; n < N; n += 8) {  // N is a multiple of 8
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + n), t);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
            _mm256_storeu_ps(row + n, v);
        }
    }
    std::free(own);
    return 0;
}

extern "C" long lowbit_set_parallel_work(long work) {
    const long before = (long)kParallelWork;
    if (work >= 0) kParallelWork = (size_t)work;
    return before;
}

extern "C" int lowbit_native_abi(void) { return 5; }
