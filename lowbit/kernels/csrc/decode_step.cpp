// One decode step of a Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3, SmolLM) per call: every layer, the
// final norm and the head, for one token, with a static key/value cache. Python (lowbit/runtime/native_lm.py)
// fills the structs of decode_common.h once from the model's modules (pointers into torch tensors it keeps
// alive) and then calls lowbit_decode_step once per token: one ctypes call instead of the ~40 torch dispatches
// a layer costs.
//
// Per layer: RMSNorm; q, k, v projections (one parallel loop over the three); optional per-head RMSNorm of q
// and k (Qwen3); rotary embedding from the cos/sin tables (rotate-half convention, tables from the model's own
// rotary module, so every RoPE scaling it implements is honoured); k and v written to the cache at `pos`;
// attention of each query head over cache positions 0..pos (grouped-query: head h reads kv head
// h / (n_heads / n_kv)); output projection; residual; RMSNorm; gate and up projections; SiLU(gate) * up; down
// projection; residual. Then the final RMSNorm and the head. Float32 throughout, as the reference path, except
// the 4-bit products where the caller allows it (LbModel.exact == 0) and the CPU has AVX-512 VNNI: those take
// the token's activations in int8 blocks of 32 (w4_vnni.h).
//
// Linears (LbLinear.kind, the structs in decode_common.h):
//   0  float32 weight (n, k) row-major                                   (an unquantized nn.Linear)
//   1  4-bit codes in the layout of weight_only_avx2.cpp (w, z, s, group); rows = n rounded up to 8
//   2  8-bit per-channel codes c (int8, (n, k)), scale s, optional offset o (lowbit.kernels.int8's layout)
// each with an optional bias (n) and an optional input scale (k; AWQ's 1/s, multiplied into the input first).
// The float tiles are the single-token tiles of weight_only_avx2.h / weight_only_avx512.h, so a linear computes
// what lowbit_w4_linear_f32 / lowbit_s8_linear_f32 compute for one row.
//
// Threads: one OpenMP team for the whole step (`threads` of them; torch's runtime), each product split over
// blocks of 8 output rows; the small vector operations run on one thread between barriers. With 1 thread no
// other thread is woken, which is what the caller picks when a core is busy (see native_lm.py).
//
// Returns 0, 1 (bad shapes or position), 2 (out of memory).

#include "weight_only_avx2.h"
#include "weight_only_avx512.h"
#include "w4_vnni.h"
#include "decode_common.h"

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace lowbit_wo;
using namespace lowbit_lm;

namespace {

int linear_ok(const LbLinear& L) {
    if (L.n <= 0 || L.k <= 0 || L.rows < L.n || !L.w) return 0;
    if (L.kind == 0) return L.rows == L.n && L.k % 8 == 0;
    if (L.kind == 1) {
        int bad = 0;
        w4_of(L, &bad);
        return L.z && L.s && bad == 0;
    }
    if (L.kind == 2) return L.rows == L.n && L.s && L.k % 8 == 0;
    return 0;
}

int blocks(const LbLinear& L) { return (L.rows + 7) / 8; }

// rows [8b, 8b + 8) of y = L(x) (x already through the input scale)
void tile(const LbLinear& L, int b, const float* x, float* y) {
    const int n0 = b * 8;
    if (L.kind == 1) {
        rows8_packed_best(w4_of(L), n0, x, L.bias, y);
    } else if (L.kind == 2) {
        const int rows = L.n - n0 < 8 ? L.n - n0 : 8;
        s8_rows(x, static_cast<const int8_t*>(L.w), L.s, L.o, L.bias, y, n0, rows, L.k);
    } else {
        const float* w = static_cast<const float*>(L.w);
        if (n0 + 8 <= L.n) {
            rows8_float(L.k, w + (size_t)n0 * L.k, x, L.bias, y, n0);
        } else {
            for (int n = n0; n < L.n; ++n) {
                __m256 acc = _mm256_setzero_ps();
                for (int k = 0; k < L.k; k += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + (size_t)n * L.k + k), _mm256_loadu_ps(x + k), acc);
                y[n] = hsum(acc) + (L.bias ? L.bias[n] : 0.0f);
            }
        }
    }
}

struct Job {
    const LbLinear* L;
    const float* x;
    float* y;
    float* scaled;  // room for L->k floats, used when L->in_scale is set
};

// whether job L runs on the integer tile (w4_vnni.h) when the caller allows it
bool takes_vnni(const LbLinear& L) { return vnni_linear(L) && have_vnni(); }

// y_j = L_j(x_j) for every job, the row blocks of all of them shared out over the team; ends with a barrier.
// Unless `exact`, each thread first quantizes the inputs of the 4-bit jobs into its own buffers (a few hundred
// nanoseconds each: cheaper than a barrier to share them).
void run_jobs(Job* jobs, int nj, bool exact) {
    int start[4], total = 0;
    bool scaled = false;
    for (int j = 0; j < nj; ++j) {
        start[j] = total;
        total += blocks(*jobs[j].L);
        scaled = scaled || jobs[j].L->in_scale;
    }
    if (scaled) {  // the same on every thread, so every thread meets the same constructs
#pragma omp single
        for (int j = 0; j < nj; ++j) {
            const LbLinear& L = *jobs[j].L;
            if (!L.in_scale) continue;
            for (int i = 0; i < L.k; ++i) jobs[j].scaled[i] = jobs[j].x[i] * L.in_scale[i];
        }
    }
    static thread_local std::vector<int8_t> codes;
    static thread_local std::vector<float> scales;
    static thread_local std::vector<int32_t> sums;
    XQ xq[4];
    bool quantized[4] = {false, false, false, false};
    if (!exact) {
        size_t need_q = 0, need_b = 0;
        for (int j = 0; j < nj; ++j)
            if (takes_vnni(*jobs[j].L)) {
                need_q += (jobs[j].L->k + 63) / 64 * 64;
                need_b += (jobs[j].L->k + 31) / 32;
            }
        if (codes.size() < need_q) codes.resize(need_q);
        if (scales.size() < need_b) scales.resize(need_b), sums.resize(need_b);
        size_t oq = 0, ob = 0;
        for (int j = 0; j < nj; ++j) {
            const LbLinear& L = *jobs[j].L;
            if (!takes_vnni(L)) continue;
            xq[j] = XQ{codes.data() + oq, scales.data() + ob, sums.data() + ob, 32};
            quantize_blocks(L.in_scale ? jobs[j].scaled : jobs[j].x, L.k, xq[j]);
            quantized[j] = true;
            oq += (L.k + 63) / 64 * 64;
            ob += (L.k + 31) / 32;
        }
    }
#pragma omp for schedule(static)
    for (int b = 0; b < total; ++b) {
        int j = 0;
        while (j + 1 < nj && b >= start[j + 1]) ++j;
        const Job& J = jobs[j];
        if (quantized[j]) {
            rows8_w4_vnni(w4_of(*J.L), J.L->zt, (b - start[j]) * 8, xq[j], J.L->bias, J.y);
        } else {
            tile(*J.L, b - start[j], J.L->in_scale ? J.scaled : J.x, J.y);
        }
    }
}

}  // namespace

// floats of scratch lowbit_decode_step needs for this model
extern "C" long lowbit_decode_scratch(const LbModel* m) {
    const long h = pad8(m->hidden), q = pad8(m->n_heads * m->head_dim), kv = pad8(m->n_kv * m->head_dim);
    const long i = pad8(m->inter), r = pad8(m->max_rows);
    return 2 * h + q + 2 * kv + q + 2 * i + r + (long)m->n_heads * m->max_len + 3 * (h > i ? h : i) + 64;
}

// 0 when every shape of the model can run, else 1 + the index of the first bad layer (n_layers + 1: the head or
// the model's own sizes)
extern "C" int lowbit_decode_check(const LbModel* m) {
    if (m->n_layers <= 0 || m->hidden <= 0 || m->n_heads <= 0 || m->n_kv <= 0 || m->n_heads % m->n_kv ||
        m->head_dim % 8 || m->max_len <= 0)
        return m->n_layers + 1;
    const int qd = m->n_heads * m->head_dim, kvd = m->n_kv * m->head_dim;
    for (int l = 0; l < m->n_layers; ++l) {
        const LbLayer& L = m->layers[l];
        const LbLinear* all[7] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
        for (const LbLinear* p : all)
            if (!linear_ok(*p) || p->rows > m->max_rows) return l + 1;
        if (L.q.k != m->hidden || L.k.k != m->hidden || L.v.k != m->hidden || L.q.n != qd || L.k.n != kvd ||
            L.v.n != kvd || L.o.k != qd || L.o.n != m->hidden || L.gate.k != m->hidden || L.up.k != m->hidden ||
            L.gate.n != m->inter || L.up.n != m->inter || L.down.k != m->inter || L.down.n != m->hidden)
            return l + 1;
    }
    if (!linear_ok(m->head) || m->head.k != m->hidden || m->head.rows > m->max_rows) return m->n_layers + 1;
    return 0;
}

// logits (head.rows floats; the first head.n are the model's) for the token whose embedding is x_in (hidden), at
// position pos; the cache must hold positions 0..pos-1 of this sequence. scratch: lowbit_decode_scratch floats.
extern "C" int lowbit_decode_step(const LbModel* m, const float* x_in, int pos, float* logits, float* scratch,
                                  int threads) {
    if (pos < 0 || pos >= m->max_len) return 1;
    const int H = m->hidden, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv, I = m->inter;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv, T = pos + 1;
    float* x = scratch;
    float* xn = x + pad8(H);
    float* q = xn + pad8(H);
    float* k = q + pad8(qd);
    float* v = k + pad8(kvd);
    float* att = v + pad8(kvd);
    float* g = att + pad8(qd);
    float* u = g + pad8(I);
    float* tmp = u + pad8(I);
    float* score_buf = tmp + pad8(m->max_rows);
    float* scaled = score_buf + (size_t)nh * m->max_len;
    const int wide = H > I ? H : I;
    float* scaled_at[3] = {scaled, scaled + wide, scaled + 2 * wide};
    std::memcpy(x, x_in, sizeof(float) * H);
    const float* cos = m->rope_cos + (size_t)pos * hd;
    const float* sin = m->rope_sin + (size_t)pos * hd;
    const size_t layer_stride = (size_t)nkv * m->max_len * hd, head_stride = (size_t)m->max_len * hd;
    const bool exact = m->exact != 0;

#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        for (int l = 0; l < m->n_layers; ++l) {
            const LbLayer& L = m->layers[l];
            float* kc = m->k_cache + l * layer_stride;
            float* vc = m->v_cache + l * layer_stride;
#pragma omp single
            rmsnorm(x, L.attn_norm, m->eps, xn, H);
            Job qkv[3] = {{&L.q, xn, q, scaled_at[0]}, {&L.k, xn, k, scaled_at[1]}, {&L.v, xn, v, scaled_at[2]}};
            run_jobs(qkv, 3, exact);
#pragma omp for schedule(static)
            for (int h = 0; h < nh + nkv; ++h) {
                if (h < nh) {
                    float* qh = q + h * hd;
                    if (L.q_norm) rmsnorm(qh, L.q_norm, m->eps, qh, hd);
                    rope(qh, cos, sin, hd);
                } else {
                    const int j = h - nh;
                    float* kh = k + j * hd;
                    if (L.k_norm) rmsnorm(kh, L.k_norm, m->eps, kh, hd);
                    rope(kh, cos, sin, hd);
                    std::memcpy(kc + j * head_stride + (size_t)pos * hd, kh, sizeof(float) * hd);
                    std::memcpy(vc + j * head_stride + (size_t)pos * hd, v + j * hd, sizeof(float) * hd);
                }
            }
#pragma omp for schedule(static)
            for (int h = 0; h < nh; ++h) {
                const float* qh = q + h * hd;
                const float* kh = kc + (h / group) * head_stride;
                const float* vh = vc + (h / group) * head_stride;
                float* s = score_buf + (size_t)h * m->max_len;
                scores(qh, kh, T, hd, m->attn_scale, s);
                softmax(s, T);
                weighted_sum(s, vh, T, hd, att + h * hd);
            }
            Job o[1] = {{&L.o, att, tmp, scaled_at[0]}};
            run_jobs(o, 1, exact);
#pragma omp single
            {
                for (int i = 0; i < H; ++i) x[i] += tmp[i];
                rmsnorm(x, L.mlp_norm, m->eps, xn, H);
            }
            Job gu[2] = {{&L.gate, xn, g, scaled_at[0]}, {&L.up, xn, u, scaled_at[1]}};
            run_jobs(gu, 2, exact);
#pragma omp for schedule(static)
            for (int i = 0; i < I; i += 64) silu_mul(g, u, i, i + 64 < I ? i + 64 : I);
            Job d[1] = {{&L.down, g, tmp, scaled_at[0]}};
            run_jobs(d, 1, exact);
#pragma omp single
            for (int i = 0; i < H; ++i) x[i] += tmp[i];
        }
#pragma omp single
        rmsnorm(x, m->final_norm, m->eps, xn, H);
        Job head[1] = {{&m->head, xn, logits, scaled_at[0]}};
        run_jobs(head, 1, exact);
    }
    return 0;
}
