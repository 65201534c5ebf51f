// Prefill / chunked-prefill attention over CQ codes with the codebooks resident in shared memory
// (issue 5). Verified against the torch reference on an H200 (tests/kernels/test_cq_prefill_cuda.py).
// Its macros and helpers come from prefill_common.cuh, which also holds the CTA set-up, staging, softmax
// and epilogue as functions for the wgmma variant; this kernel body keeps its verified inline form
// (byte-identical SASS) until a GPU run re-verifies it on those functions, whose form changes the code
// the compiler emits.
//
// Compiled by NVRTC (cuda_build.py) with -D macros: G (query heads per KV head), HEAD_DIM (64 or 128),
// CK, CV (channels per key / value centroid, 8-bit codes), HAS_ROPE (keys stored before RoPE), IS_BF16,
// WINDOW_PARTIALS (1: write unnormalized partials for the recent-window merge; 0: the output).
//
// FlashAttention-2 shape, with a dequantization stage:
//   CTA = (query block, KV head), 8 warps. Its rows are (token, GQA head) pairs, 16 per warp: BQ = 128 / G
//   tokens of one sequence; blocks of a sequence run last-first (the causal diagonal makes later blocks
//   the longest, so they start in the first wave). Per key tile of BN = 64 keys, the 256 threads (4 per
//   key) gather their key's centroids from the shared-memory codebooks, rotate them by the key's
//   position (fp32), and store the tile once as bf16/fp16 rows in shared memory (16-byte chunks
//   XOR-swizzled by row, so ldmatrix reads them without bank conflicts); values likewise, not rotated.
//   Keys past the block's last visible position are stored as zeros. Then each warp runs S = Q K^T
//   (mma.sync m16n8k16, B fragments by ldmatrix), the causal mask (diagonal tiles only), an online
//   softmax with a lazily rescaled max, and O += P V (P from the S accumulators, V fragments by
//   ldmatrix.trans).
//
// Pipelining (one CTA of 8 warps per SM: latency has to be hidden inside the CTA): key and value tiles
// are double-buffered, so one barrier per tile separates staging tile i + 1 from computing tile i; a
// tile's code bytes (block table, then the slot) are loaded into registers one tile ahead, while the
// previous tile computes. The rotation of key n = t0 + j is the tile start's cos/sin row (one 512-byte
// row per tile, loaded two tiles ahead into a small shared buffer) times the pure rotation by j
// positions (rows j / row 0 of the cache, in shared memory for the CTA's life): no per-key cos/sin
// row from L2, which was the first version's bottleneck (32 KB of L2 reads per tile).

#include "prefill_common.cuh"

// byte offset of 16-byte chunk `c` of tile row `j` (rows of HEAD_DIM 16-bit values, chunks XOR-swizzled)
__device__ __forceinline__ int tile_off(int j, int c) { return j * (HEAD_DIM * 2) + ((c ^ (j & 7)) << 4); }

__device__ __forceinline__ void ldsm_x4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

extern "C" __global__ void __launch_bounds__(NT, 1) cq_prefill_kernel(CQ_PREFILL_PARAMS) {
    extern __shared__ __align__(16) u8 smem[];
    u16* kcb = reinterpret_cast<u16*>(smem);
    u16* vcb = kcb + GK * 256 * CK;
    u8* tiles = smem + 2 * CB_BYTES;  // [2 buffers][keys, values][BN][HEAD_DIM]
#if HAS_ROPE
    // rot[i][thread]: its key offset's pure rotation (cos, cos, sin, sin of pairs 2i, 2i + 1 of its slice)
    float4* rot = reinterpret_cast<float4*>(tiles + 4 * TILE_BYTES);
    float* base = reinterpret_cast<float*>(rot + (PPT / 2) * NT);  // [2][HEAD_DIM]: tile start's cos | sin
#endif

    const int pid = blockIdx.x, h = blockIdx.y, hq = gridDim.y * G;
    const int i_s = find_seq(qsl, pid, num_seqs);
    const int q_start = qsl[i_s], q_len = qsl[i_s + 1] - q_start;
    const int local = pid - (q_start / BQ + i_s), nqb = (q_len + BQ - 1) / BQ;
    if (local >= nqb) return;
    const int qb = nqb - 1 - local;  // last blocks first
    const int seq_len = seq_lens[i_s];
    const int ctx = seq_len - q_len;
    const int kv_hi = max(min(seq_len, ctx + (qb + 1) * BQ) - win, 0);  // keys any row of the block sees
    const int diag0 = ctx + qb * BQ - win;  // the last key the block's first token sees: tiles up to it are unmasked

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int sj = threadIdx.x >> 2, sq = threadIdx.x & 3;  // staging: key sj of the tile, part sq
    const int* bt = block_table + (i64)i_s * stride_bt;
    const u8* head_base = cache + (i64)h * stride_ch;

    // the next tile's code bytes for key t0 + sj, in registers a tile ahead
    Codes<NGT> c1, c2;
    Codes<NGVP> cv;
    bool c_ok = false;
    auto fetch = [&](int t0) {
        const int n = t0 + sj;
        c_ok = n < kv_hi;
        if (c_ok) {
            const u8* slot = head_base + (i64)bt[n / block_size] * stride_cb + (i64)(n % block_size) * stride_co;
            ldg_codes<NGT>(slot + sq * NGT, c1);
            ldg_codes<NGT>(slot + GK / 2 + sq * NGT, c2);
            ldg_codes<NGVP>(slot + v_offset + sq * NGVP, cv);
        }
    };
    fetch(0);
#if HAS_ROPE
    // tile starts' cos/sin rows: tile 0's now, tile 1's in registers (threads < HEAD_DIM / 4)
    float4 base_next = make_float4(0.f, 0.f, 0.f, 0.f);
    if (threadIdx.x < HEAD_DIM / 4) {
        reinterpret_cast<float4*>(base)[threadIdx.x] = *reinterpret_cast<const float4*>(cos_sin + 4 * threadIdx.x);
        if (BN < kv_hi) base_next = *reinterpret_cast<const float4*>(cos_sin + BN * stride_cs + 4 * threadIdx.x);
    }
#endif

    {  // this head's codebooks, 16 bytes per thread and load
        const uint4* src_k = reinterpret_cast<const uint4*>(kcb_g + (i64)h * (GK * 256 * CK));
        const uint4* src_v = reinterpret_cast<const uint4*>(vcb_g + (i64)h * (GV * 256 * CV));
        uint4* dst = reinterpret_cast<uint4*>(smem);
        constexpr int n16 = CB_BYTES / 16;
        for (int i = threadIdx.x; i < n16; i += NT) {
            dst[i] = __ldg(src_k + i);
            dst[n16 + i] = __ldg(src_v + i);
        }
    }
#if HAS_ROPE
    {  // pure rotations by sj positions: row sj over row 0 (vLLM's scaled caches hold mscale * cos, mscale * sin)
#pragma unroll
        for (int i = 0; i < PPT / 2; ++i) {
            const int p = sq * PPT + 2 * i;
            const float* r = cos_sin + (i64)sj * stride_cs;
            const float m0 = cos_sin[p], m1 = cos_sin[p + 1];
            rot[i * NT + threadIdx.x] = make_float4(r[p] / m0, r[p + 1] / m1, r[HALF + p] / m0, r[HALF + p + 1] / m1);
        }
    }
#endif

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
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};  // m_run in scaled (log2) units
    __syncthreads();  // codebooks, rotations and tile 0's cos/sin row staged

    for (int t0 = 0, buf = 0; t0 < kv_hi; t0 += BN, buf ^= 1) {
        u8* ks = tiles + buf * (2 * TILE_BYTES);
        u8* vs = ks + TILE_BYTES;
        {  // stage key t0 + sj: rotated key pairs [sq*PPT, (sq+1)*PPT), value channels [sq*VPT, (sq+1)*VPT)
            u32 y1[PPT / 2], y2[PPT / 2], vw[VPT / 2];
            if (c_ok) {
                u32 w1[PPT / 2], w2[PPT / 2];
#pragma unroll
                for (int j = 0; j < NGT; ++j) {
                    const int g1 = sq * NGT + j;
                    lds_words<CK>(kcb + (g1 * 256 + code_of(c1, j)) * CK, w1 + j * (CK / 2));
                    lds_words<CK>(kcb + ((GK / 2 + g1) * 256 + code_of(c2, j)) * CK, w2 + j * (CK / 2));
                }
#pragma unroll
                for (int j = 0; j < NGVP; ++j) {
                    lds_words<CV>(vcb + ((sq * NGVP + j) * 256 + code_of(cv, j)) * CV, vw + j * (CV / 2));
                }
#if HAS_ROPE
                const float* bc = base + buf * HEAD_DIM + sq * PPT;
#pragma unroll
                for (int i = 0; i < PPT / 4; ++i) {  // pairs 4i .. 4i + 3 of the slice
                    const float4 cb = *reinterpret_cast<const float4*>(bc + 4 * i);
                    const float4 sb = *reinterpret_cast<const float4*>(bc + HALF + 4 * i);
#pragma unroll
                    for (int u = 0; u < 2; ++u) {
                        const float4 r = rot[(2 * i + u) * NT + threadIdx.x];
                        const float cb0 = u ? cb.z : cb.x, cb1 = u ? cb.w : cb.y;
                        const float sb0 = u ? sb.z : sb.x, sb1 = u ? sb.w : sb.y;
                        const float c0 = cb0 * r.x - sb0 * r.z, s0 = sb0 * r.x + cb0 * r.z;
                        const float c1f = cb1 * r.y - sb1 * r.w, s1 = sb1 * r.y + cb1 * r.w;
                        const int k = 2 * i + u;
                        const float a1 = lo_f(w1[k]), b1 = hi_f(w1[k]), a2 = lo_f(w2[k]), b2 = hi_f(w2[k]);
                        y1[k] = pack2(a1 * c0 - a2 * s0, b1 * c1f - b2 * s1);
                        y2[k] = pack2(a2 * c0 + a1 * s0, b2 * c1f + b1 * s1);
                    }
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
#if HAS_ROPE
        // the next tile's cos/sin row into the other buffer (read after this tile's barrier); load the one after
        if (threadIdx.x < HEAD_DIM / 4) {
            reinterpret_cast<float4*>(base + (buf ^ 1) * HEAD_DIM)[threadIdx.x] = base_next;
            if (t0 + 2 * BN < kv_hi) {
                base_next = *reinterpret_cast<const float4*>(cos_sin + (i64)(t0 + 2 * BN) * stride_cs + 4 * threadIdx.x);
            }
        }
#endif
        fetch(t0 + BN);
        __syncthreads();  // tile staged; the other buffer's tile (two steps back) consumed by every warp

        const u32 ks_base = smem_u32(ks), vs_base = smem_u32(vs);
        // S = Q K^T for this warp's 16 rows and the tile's 64 keys (raw scores)
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
        if (t0 + BN - 1 > diag0) {  // a diagonal (or window-edge, or last) tile: causal mask
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int n = t0 + 8 * nt + 2 * tig + (e & 1), p = pos[e >> 1];
                    if (p < 0 || n > p - win) s[nt][e] = NEG_INF;
                }
            }
        }
        // online softmax per row (gid: s[..][0..1], gid + 8: s[..][2..3])
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
            mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            mx[r] *= qk_scale;
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
                s[nt][e] = exp2f(fmaf(s[nt][e], qk_scale, -mu[e >> 1]));
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
