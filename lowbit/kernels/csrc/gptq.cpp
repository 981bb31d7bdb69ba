// GPTQ's column loop inside one lazy-batch block, for integer grids fixed before the loop (lowbit's default:
// act-order with static groups, or ranges chosen up front by the clipping search or by AWQ).
//
// Called by lowbit/algorithms/gptq.py with, all float32, row-major and contiguous:
//   W    (rows, n)  the block's columns of the (error-updated) weight, in processing order; updated in place
//   U    (n, ldu)   the block's rows of the upper Cholesky factor of H^-1; U[i, i .. n) is read
//   s    (rows, n)  per row and column, the scale of the column's tile
//   safe (rows, n)  the same scale with zeros replaced by one (the divisor)
//   z    (rows, n)  the zero point (asymmetric grids), or null for symmetric ones (codes -half .. half - 1)
//   Q    (rows, n)  out: the chosen quantized values
//   E    (rows, n)  out: the scaled errors err_i = (w_i - q_i) / U[i, i]
// For every row (rows are independent once the grid is fixed), column i in order:
//   q = (clamp(round(w / safe + z), 0, 2^bits - 1) - z) * s      (asymmetric)
//   q = clamp(round(w / safe), -half, half - 1) * s             (symmetric)
//   err = (w - q) / U[i, i];  w_j -= err * U[i, j] for j > i.
// This is the arithmetic of gptq.py's Python loop, operation for operation (round half to even, no fused
// multiply-adds: the library is built with -ffp-contract=off), so both give the same weights bit for bit.
//
// Threads: torch's count, over rows, for blocks of at least kParallelWork multiply-adds.

#include <stddef.h>
#include <cmath>
#include <omp.h>

extern size_t kParallelWork;

extern "C" int lowbit_gptq_block(float* W, const float* U, int ldu, const float* s, const float* safe,
                                 const float* z, float* Q, float* E, int rows, int n, int bits, int threads) {
    if (rows < 0 || n <= 0 || ldu < n || bits < 1 || bits > 16) return 1;
    const float qmax = (float)((1 << bits) - 1), half = (float)(1 << (bits - 1));
    const size_t work = (size_t)rows * n * n / 2;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (work >= kParallelWork)
    for (int r = 0; r < rows; ++r) {
        float* w = W + (size_t)r * n;
        const float* sr = s + (size_t)r * n;
        const float* dr = safe + (size_t)r * n;
        const float* zr = z ? z + (size_t)r * n : nullptr;
        float* q = Q + (size_t)r * n;
        float* e = E + (size_t)r * n;
        for (int i = 0; i < n; ++i) {
            const float x = w[i];
            float v;
            if (zr) {
                const float c = std::fmin(std::fmax(std::nearbyint(x / dr[i] + zr[i]), 0.0f), qmax);
                v = (c - zr[i]) * sr[i];
            } else {
                v = std::fmin(std::fmax(std::nearbyint(x / dr[i]), -half), half - 1.0f) * sr[i];
            }
            const float* u = U + (size_t)i * ldu;
            const float err = (x - v) / u[i];
            q[i] = v;
            e[i] = err;
            for (int j = i + 1; j < n; ++j) w[j] = w[j] - err * u[j];
        }
    }
    return 0;
}
