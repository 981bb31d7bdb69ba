// A prompt through the decode engine's model (decode_common.h) in one call: M tokens at positions pos0.., every
// layer, their keys and values written to the cache, and the logits of the last token. The products are the
// integer tile of w4_vnni.h with each 8-row block of weights read once for all M tokens (it stays in L1 while
// every token's int8 activations pass it), so a prompt costs the integer dot products, not M reads of the
// weights: batch-size-aware dispatch, where the single-token step (decode_step.cpp) is bound by those reads.
//
// Only for models whose every linear takes that tile (4-bit codes, groups a multiple of 64, AVX-512 VNNI, int8
// activation blocks): lowbit_prefill_ok says; Python prefills other models in torch.
//
// Per layer, each phase a parallel loop over tokens (or token x head, or weight blocks) ending in a barrier:
// RMSNorm; q, k, v; per-head norm and rotary embedding, k and v into the cache; causal attention (token i sees
// positions 0..pos0 + i); output projection and residual; RMSNorm; gate and up; SiLU(gate) * up; down and
// residual. Then the final norm and the head for the last token only.

#include "decode_common.h"
#include "w4_vnni.h"

#include <omp.h>

#include <cstring>
#include <vector>

using namespace lowbit_wo;
using namespace lowbit_lm;

namespace {

struct GJob {
    const LbLinear* L;
    const float* x;  // M rows at stride ldx
    int ldx;
    float* y;  // M rows at stride ldy
    int ldy;
};

// the M tokens' inputs of up to three products, quantized (shared by the team)
struct Quantized {
    std::vector<int8_t> codes;
    std::vector<float> scales;
    std::vector<int32_t> sums;
    std::vector<XQ> xq;  // one per token, blocks of 64 columns (see rows8_w4_vnni_tokens)
    int stride_q = 0, stride_b = 0;
};

// y_j[m] = L_j(x_j[m]) for every job and token: the inputs quantized in one parallel loop, then the 8-row
// weight blocks of all jobs shared out, each against every token. Two barriers.
void gemm(GJob* jobs, int nj, int M, Quantized* qs) {
#pragma omp for schedule(static)
    for (int i = 0; i < nj * M; ++i) {
        const int j = i / M, m = i % M;
        const LbLinear& L = *jobs[j].L;
        static thread_local std::vector<float> scaled;
        const float* x = jobs[j].x + (size_t)m * jobs[j].ldx;
        if (L.in_scale) {
            scaled.resize(L.k);
            for (int c = 0; c < L.k; ++c) scaled[c] = x[c] * L.in_scale[c];
            x = scaled.data();
        }
        Quantized& Q = qs[j];
        Q.xq[m] = XQ{Q.codes.data() + (size_t)m * Q.stride_q, Q.scales.data() + (size_t)m * Q.stride_b,
                     Q.sums.data() + (size_t)m * Q.stride_b, 64};
        quantize_blocks(x, L.k, Q.xq[m]);
    }
    int start[4], total = 0;
    for (int j = 0; j < nj; ++j) {
        start[j] = total;
        total += (jobs[j].L->rows + 7) / 8;
    }
#pragma omp for schedule(static)
    for (int b = 0; b < total; ++b) {
        int j = 0;
        while (j + 1 < nj && b >= start[j + 1]) ++j;
        const LbLinear& L = *jobs[j].L;
        rows8_w4_vnni_tokens(w4_of(L), L.zt, (b - start[j]) * 8, qs[j].xq.data(), M, L.bias, jobs[j].y, jobs[j].ldy);
    }
}

}  // namespace

// 1 when lowbit_prefill can run this model here (every linear on the integer tile), else 0
extern "C" int lowbit_prefill_ok(const LbModel* m) {
    if (!have_vnni() || m->exact) return 0;
    for (int l = 0; l < m->n_layers; ++l) {
        const LbLayer& L = m->layers[l];
        const LbLinear* all[7] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
        for (const LbLinear* p : all)
            if (!vnni_linear(*p)) return 0;
    }
    return vnni_linear(m->head);
}

// x_in: the M tokens' embeddings (M, hidden); logits: head.rows floats for the last token. The cache must hold
// positions 0..pos0-1. Returns 0, 1 (positions or a model lowbit_prefill_ok refuses), 2 (out of memory).
extern "C" int lowbit_prefill(const LbModel* m, const float* x_in, int pos0, int M, float* logits, int threads) {
    if (M < 1 || pos0 < 0 || pos0 + M > m->max_len || !lowbit_prefill_ok(m)) return 1;
    const int H = m->hidden, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv, I = m->inter;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    const int lh = pad8(H), lq = pad8(qd), lkv = pad8(kvd), li = pad8(I);
    std::vector<float> x, xn, q, k, v, att, g, u, tmp;
    Quantized qs[3];
    try {
        x.assign(x_in, x_in + (size_t)M * H);
        for (auto* buf : {&xn, &tmp}) buf->resize((size_t)M * lh);
        for (auto* buf : {&q, &att}) buf->resize((size_t)M * lq);
        for (auto* buf : {&k, &v}) buf->resize((size_t)M * lkv);
        for (auto* buf : {&g, &u}) buf->resize((size_t)M * li);
        const int wide = H > I ? (H > qd ? H : qd) : (I > qd ? I : qd);
        for (Quantized& Q : qs) {
            Q.stride_q = (wide + 63) / 64 * 64;
            Q.stride_b = (wide + 63) / 64;
            Q.codes.resize((size_t)M * Q.stride_q);
            Q.scales.resize((size_t)M * Q.stride_b);
            Q.sums.resize((size_t)M * Q.stride_b);
            Q.xq.resize(M);
        }
    } catch (const std::bad_alloc&) {
        return 2;
    }
    const size_t layer_stride = (size_t)nkv * m->max_len * hd, head_stride = (size_t)m->max_len * hd;
    float* X = x.data();  // rows of H floats (the input's layout), the others padded to 8

#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        static thread_local std::vector<float> score_buf;
        score_buf.resize(m->max_len);
        for (int l = 0; l < m->n_layers; ++l) {
            const LbLayer& L = m->layers[l];
            float* kc = m->k_cache + l * layer_stride;
            float* vc = m->v_cache + l * layer_stride;
#pragma omp for schedule(static)
            for (int t = 0; t < M; ++t) rmsnorm(X + (size_t)t * H, L.attn_norm, m->eps, &xn[(size_t)t * lh], H);
            GJob qkv[3] = {{&L.q, xn.data(), lh, q.data(), lq}, {&L.k, xn.data(), lh, k.data(), lkv},
                           {&L.v, xn.data(), lh, v.data(), lkv}};
            gemm(qkv, 3, M, qs);
#pragma omp for schedule(static)
            for (int i = 0; i < M * (nh + nkv); ++i) {
                const int t = i / (nh + nkv), h = i % (nh + nkv), pos = pos0 + t;
                const float* cos = m->rope_cos + (size_t)pos * hd;
                const float* sin = m->rope_sin + (size_t)pos * hd;
                if (h < nh) {
                    float* qh = &q[(size_t)t * lq + h * hd];
                    if (L.q_norm) rmsnorm(qh, L.q_norm, m->eps, qh, hd);
                    rope(qh, cos, sin, hd);
                } else {
                    const int j = h - nh;
                    float* kh = &k[(size_t)t * lkv + j * hd];
                    if (L.k_norm) rmsnorm(kh, L.k_norm, m->eps, kh, hd);
                    rope(kh, cos, sin, hd);
                    std::memcpy(kc + j * head_stride + (size_t)pos * hd, kh, sizeof(float) * hd);
                    std::memcpy(vc + j * head_stride + (size_t)pos * hd, &v[(size_t)t * lkv + j * hd],
                                sizeof(float) * hd);
                }
            }
#pragma omp for schedule(dynamic, 4)
            for (int i = 0; i < M * nh; ++i) {
                const int t = i / nh, h = i % nh, T = pos0 + t + 1;
                float* s = score_buf.data();
                scores(&q[(size_t)t * lq + h * hd], kc + (h / group) * head_stride, T, hd, m->attn_scale, s);
                softmax(s, T);
                weighted_sum(s, vc + (h / group) * head_stride, T, hd, &att[(size_t)t * lq + h * hd]);
            }
            GJob o[1] = {{&L.o, att.data(), lq, tmp.data(), lh}};
            gemm(o, 1, M, qs);
#pragma omp for schedule(static)
            for (int t = 0; t < M; ++t) {
                float* xt = X + (size_t)t * H;
                for (int c = 0; c < H; ++c) xt[c] += tmp[(size_t)t * lh + c];
                rmsnorm(xt, L.mlp_norm, m->eps, &xn[(size_t)t * lh], H);
            }
            GJob gu[2] = {{&L.gate, xn.data(), lh, g.data(), li}, {&L.up, xn.data(), lh, u.data(), li}};
            gemm(gu, 2, M, qs);
#pragma omp for schedule(static)
            for (int t = 0; t < M; ++t) silu_mul(&g[(size_t)t * li], &u[(size_t)t * li], 0, I);
            GJob d[1] = {{&L.down, g.data(), li, tmp.data(), lh}};
            gemm(d, 1, M, qs);
#pragma omp for schedule(static)
            for (int t = 0; t < M; ++t)
                for (int c = 0; c < H; ++c) X[(size_t)t * H + c] += tmp[(size_t)t * lh + c];
        }
#pragma omp single
        rmsnorm(X + (size_t)(M - 1) * H, m->final_norm, m->eps, xn.data(), H);
        GJob head[1] = {{&m->head, xn.data(), lh, logits, 0}};
        gemm(head, 1, 1, qs);
    }
    return 0;
}
