// Prefill / chunked-prefill attention over CQ codes with the codebooks resident in shared memory
// (issue 5). NOT YET RUN ON A GPU: compiled for sm_90 in CI; the dispatch takes it only when asked
// (VLLM_CQ_PREFILL_KERNEL=cuda) until tests/kernels/test_cq_prefill_cuda.py has passed on one.
//
// Compiled by NVRTC (cuda_build.py) with -D macros: G (query heads per KV head), HEAD_DIM (64 or 128),
// CK, CV (channels per key / value centroid, 8-bit codes), HAS_ROPE (keys stored before RoPE), IS_BF16,
// WINDOW_PARTIALS (1: write unnormalized partials for the recent-window merge; 0: the output).
//
// FlashAttention-2 shape, with a dequantization stage:
//   CTA = (query block, KV head), 8 warps. Its rows are (token, GQA head) pairs, 16 per warp: BQ = 128 / G
//   tokens of one sequence. Per key tile of BN = 64 keys, the 256 threads (4 per key) gather their
//   key's centroids from the shared-memory codebooks, rotate them by the key's position (fp32), and
//   store the tile once as bf16/fp16 rows in shared memory (16-byte chunks XOR-swizzled by row, so
//   ldmatrix reads them without bank conflicts); values likewise, not rotated. Keys past the
//   block's last visible position are stored as zeros. Then each warp runs S = Q K^T (mma.sync
//   m16n8k16, B fragments by ldmatrix), the causal mask, an online softmax with a lazily rescaled max,
//   and O += P V (P from the S accumulators, V fragments by ldmatrix.trans).

#include "cq_common.cuh"

#define NW 8
#define BN 64                     // keys per tile (4 threads per key)
#define HALF (HEAD_DIM / 2)
#define GK (HEAD_DIM / CK)
#define GV (HEAD_DIM / CV)
#define KT (HEAD_DIM / 16)        // k-steps of S
#define DT (HEAD_DIM / 8)         // 8-dim n-tiles of O, 16-byte chunks per tile row
#define ROWS (NW * 16)
#define BQ (ROWS / G)             // query tokens per CTA
#define PPT (HALF / 4)            // RoPE pairs a staging thread rotates
#define NGT (PPT / CK)            // key centroids per half it gathers
#define VPT (HEAD_DIM / 4)        // value channels a staging thread gathers
#define NGVP (VPT / CV)           // value centroids it gathers
#define LAZY_MAX 8.f

#if (PPT % CK) != 0 || (VPT % CV) != 0 || HEAD_DIM < 64 || (HEAD_DIM % 16) != 0 || G > 16
#error "unsupported CQ prefill instance"
#endif

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// byte offset of 16-byte chunk `c` of tile row `j` (rows of HEAD_DIM 16-bit values)
__device__ __forceinline__ int tile_off(int j, int c) { return j * (HEAD_DIM * 2) + ((c ^ (j & 7)) << 4); }

template <int N>
__device__ __forceinline__ void sts_words(u8* tile, int j, int dim0, const u32* w) {
    static_assert(N % 8 == 0, "whole 16-byte chunks");
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
        *reinterpret_cast<uint4*>(tile + tile_off(j, dim0 / 8 + i)) =
            make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
}

// largest s in [0, num_seqs) with qsl[s] / BQ + s <= pid (every sequence owns at least one block)
__device__ __forceinline__ int find_seq(const int* qsl, int pid, int num_seqs) {
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (qsl[mid] / BQ + mid <= pid) lo = mid; else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(NW * 32, 1) cq_prefill_kernel(
    const u16* __restrict__ q,        // [T, Hq, D]
    void* __restrict__ out,           // [T, Hq, D] model dtype, or float32 partials [T, Hq, 1, D]
    float* __restrict__ ml,           // [T, Hq, 1, 2] (WINDOW_PARTIALS)
    const u8* __restrict__ cache,     // [num_blocks, Hkv, block_size, slot_bytes]
    const u16* __restrict__ kcb_g,    // [Hkv * GK, 256, CK]
    const u16* __restrict__ vcb_g,    // [Hkv * GV, 256, CV]
    const int* __restrict__ block_table,
    const int* __restrict__ seq_lens,
    const int* __restrict__ qsl,
    const float* __restrict__ cos_sin,  // [max_pos, D]: cos | sin
    int num_seqs, i64 stride_qt, i64 stride_qh, i64 stride_ot, i64 stride_oh, i64 stride_cb, i64 stride_ch,
    i64 stride_co, i64 stride_bt, i64 stride_cs, float qk_scale, int block_size, int v_offset, int win) {
    extern __shared__ __align__(16) u8 smem[];
    u16* kcb = reinterpret_cast<u16*>(smem);
    u16* vcb = kcb + GK * 256 * CK;
    u8* ks = smem + 2 * HEAD_DIM * 256 * 2;  // [BN][HEAD_DIM] rotated keys
    u8* vs = ks + BN * HEAD_DIM * 2;         // [BN][HEAD_DIM] values

    const int pid = blockIdx.x, h = blockIdx.y, hq = gridDim.y * G;
    const int i_s = find_seq(qsl, pid, num_seqs);
    const int q_start = qsl[i_s], q_len = qsl[i_s + 1] - q_start;
    const int qb = pid - (q_start / BQ + i_s);
    if (qb * BQ >= q_len) return;
    const int seq_len = seq_lens[i_s];
    const int ctx = seq_len - q_len;
    const int kv_hi = max(min(seq_len, ctx + (qb + 1) * BQ) - win, 0);  // keys any row of the block sees

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;

    {  // this head's codebooks, 16 bytes per thread and load
        const uint4* src_k = reinterpret_cast<const uint4*>(kcb_g + (i64)h * (GK * 256 * CK));
        const uint4* src_v = reinterpret_cast<const uint4*>(vcb_g + (i64)h * (GV * 256 * CV));
        uint4* dst = reinterpret_cast<uint4*>(smem);
        constexpr int n16 = HEAD_DIM * 256 * 2 / 16;
        for (int i = threadIdx.x; i < n16; i += NW * 32) {
            dst[i] = __ldg(src_k + i);
            dst[n16 + i] = __ldg(src_v + i);
        }
    }

    // this warp's rows gid and gid + 8: (token, head), query position (-1: padding row)
    int tok[2], head[2], pos[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + gid + 8 * r;
        tok[r] = qb * BQ + row / G;
        head[r] = h * G + row % G;
        pos[r] = (row < BQ * G && tok[r] < q_len) ? ctx + tok[r] : -1;
    }
    u32 qa[KT][4];
#pragma unroll
    for (int k = 0; k < KT; ++k) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const u16* qr = q + (i64)(q_start + tok[r]) * stride_qt + (i64)head[r] * stride_qh + 16 * k + 2 * tig;
            qa[k][r] = pos[r] >= 0 ? *reinterpret_cast<const u32*>(qr) : 0u;
            qa[k][2 + r] = pos[r] >= 0 ? *reinterpret_cast<const u32*>(qr + 8) : 0u;
        }
    }

    float o[DT][4];
#pragma unroll
    for (int n = 0; n < DT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};

    const int* bt = block_table + (i64)i_s * stride_bt;
    const u8* head_base = cache + (i64)h * stride_ch;
    const int sj = threadIdx.x >> 2, sq = threadIdx.x & 3;  // staging: key sj of the tile, part sq
    const u32 ks_base = smem_u32(ks), vs_base = smem_u32(vs);

    for (int t0 = 0; t0 < kv_hi; t0 += BN) {
        __syncthreads();  // codebooks staged / the previous tile consumed
        {  // stage key t0 + sj: rotated key pairs [sq*PPT, (sq+1)*PPT), value channels [sq*VPT, (sq+1)*VPT)
            const int n = t0 + sj;
            u32 y1[PPT / 2], y2[PPT / 2], vw[VPT / 2];
            if (n < kv_hi) {
                const u8* slot = head_base + (i64)bt[n / block_size] * stride_cb + (i64)(n % block_size) * stride_co;
                u32 w1[PPT / 2], w2[PPT / 2];
#pragma unroll
                for (int j = 0; j < NGT; ++j) {
                    const int g1 = sq * NGT + j;
                    lds_words<CK>(kcb + (g1 * 256 + slot[g1]) * CK, w1 + j * (CK / 2));
                    lds_words<CK>(kcb + ((GK / 2 + g1) * 256 + slot[GK / 2 + g1]) * CK, w2 + j * (CK / 2));
                }
#pragma unroll
                for (int j = 0; j < NGVP; ++j) {
                    const int g = sq * NGVP + j;
                    lds_words<CV>(vcb + (g * 256 + slot[v_offset + g]) * CV, vw + j * (CV / 2));
                }
#if HAS_ROPE
                const float* row = cos_sin + (i64)n * stride_cs + sq * PPT;
#pragma unroll
                for (int i = 0; i < PPT / 2; ++i) {
                    const float2 c = *reinterpret_cast<const float2*>(row + 2 * i);
                    const float2 s = *reinterpret_cast<const float2*>(row + HALF + 2 * i);
                    const float a1 = lo_f(w1[i]), b1 = hi_f(w1[i]), a2 = lo_f(w2[i]), b2 = hi_f(w2[i]);
                    y1[i] = pack2(a1 * c.x - a2 * s.x, b1 * c.y - b2 * s.y);
                    y2[i] = pack2(a2 * c.x + a1 * s.x, b2 * c.y + b1 * s.y);
                }
#else
#pragma unroll
                for (int i = 0; i < PPT / 2; ++i) { y1[i] = w1[i]; y2[i] = w2[i]; }
#endif
            } else {  // past the block's visible keys: zeros (masked scores; no stale NaN into P V)
#pragma unroll
                for (int i = 0; i < PPT / 2; ++i) y1[i] = y2[i] = 0u;
#pragma unroll
                for (int i = 0; i < VPT / 2; ++i) vw[i] = 0u;
            }
            sts_words<PPT>(ks, sj, sq * PPT, y1);
            sts_words<PPT>(ks, sj, HALF + sq * PPT, y2);
            sts_words<VPT>(vs, sj, sq * VPT, vw);
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys
        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kp = 0; kp < KT / 2; ++kp) {  // two k-steps per ldmatrix.x4: chunks 4kp .. 4kp + 3
                u32 b[4];
                ldsm_x4(ks_base + tile_off(8 * nt + (lane & 7), 4 * kp + (lane >> 3)), b);
                mma16816(s[nt], qa[2 * kp][0], qa[2 * kp][1], qa[2 * kp][2], qa[2 * kp][3], b[0], b[1]);
                mma16816(s[nt], qa[2 * kp + 1][0], qa[2 * kp + 1][1], qa[2 * kp + 1][2], qa[2 * kp + 1][3], b[2], b[3]);
            }
        }
        // causal / window mask, online softmax per row (gid: s[..][0..1], gid + 8: s[..][2..3])
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, n = t0 + 8 * nt + 2 * tig + (e & 1);
                const bool vis = pos[r] >= 0 && n <= pos[r] - win;
                s[nt][e] = vis ? s[nt][e] * qk_scale : NEG_INF;
                mx[r] = fmaxf(mx[r], s[nt][e]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            if (mx[r] > m_run[r] + LAZY_MAX) {  // lazy: the max moves only past 2^LAZY_MAX (quad-uniform)
                const float alpha = exp2f(m_run[r] - mx[r]);
                l_run[r] *= alpha;
#pragma unroll
                for (int n = 0; n < DT; ++n) { o[n][2 * r] *= alpha; o[n][2 * r + 1] *= alpha; }
                m_run[r] = mx[r];
            }
        }
        const float mu[2] = {m_run[0] == NEG_INF ? 0.f : m_run[0], m_run[1] == NEG_INF ? 0.f : m_run[1]};
        u32 pa[BN / 8][2];  // P packed: [n-tile][row gid / gid + 8]
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = exp2f(s[nt][e] - mu[e >> 1]);
                l_run[e >> 1] += s[nt][e];
            }
            pa[nt][0] = pack2(s[nt][0], s[nt][1]);
            pa[nt][1] = pack2(s[nt][2], s[nt][3]);
        }
        // O += P V: k-steps of 16 keys, V fragments by ldmatrix.trans (two 8-dim n-tiles per load)
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int nd = 0; nd < DT; nd += 2) {
                u32 b[4];
                const int key = 16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7);
                ldsm_x4_t(vs_base + tile_off(key, nd + (lane >> 4)), b);
                mma16816(o[nd], pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1], b[0], b[1]);
                mma16816(o[nd + 1], pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1], b[2], b[3]);
            }
        }
    }

    // rows' sums over the quad; write (each thread: rows gid, gid + 8, dims 8n + 2tig, + 1)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
        if (pos[r] < 0) continue;
        const i64 t = q_start + tok[r];
#if WINDOW_PARTIALS
        const i64 pi = t * hq + head[r];  // one segment
        float* po = reinterpret_cast<float*>(out) + pi * HEAD_DIM;
#pragma unroll
        for (int n = 0; n < DT; ++n) {
            *reinterpret_cast<float2*>(po + 8 * n + 2 * tig) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
        }
        if (tig == 0) {
            ml[pi * 2] = m_run[r];
            ml[pi * 2 + 1] = l_run[r];
        }
#else
        const float inv = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
        u16* po = reinterpret_cast<u16*>(out) + t * stride_ot + (i64)head[r] * stride_oh;
#pragma unroll
        for (int n = 0; n < DT; ++n) {
            *reinterpret_cast<u32*>(po + 8 * n + 2 * tig) = pack2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        }
#endif
    }
}
