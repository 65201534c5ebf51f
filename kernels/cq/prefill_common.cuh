// What the CQ prefill kernels share (prefill_cuda.cu: mma.sync; prefill_wgmma.cu: Hopper wgmma): the
// -D macros and shapes, the kernel signature, the CTA's query block, the codebooks and pure rotations
// staged in shared memory, the code bytes loaded a tile ahead, the staging of one key tile (gather,
// rotate, store), the online softmax of one tile's scores, and the epilogue. The including kernel
// defines `tile_off(j, c)` (declared here), the byte offset of 16-byte chunk c of key j in a staged
// tile: the two kernels store their tiles in the layouts their products read.
//
// Macros: G (query heads per KV head), HEAD_DIM (64 or 128), CK, CV (channels per key / value centroid,
// 8-bit codes), HAS_ROPE (keys stored before RoPE), IS_BF16, WINDOW_PARTIALS (1: unnormalized partials
// for the recent-window merge; 0: the output).
#pragma once

#include "cq_common.cuh"

#define NW 8
#define NT (NW * 32)
#define BN 64                     // keys per tile (4 threads per key)
#define HALF (HEAD_DIM / 2)
#define GK (HEAD_DIM / CK)
#define GV (HEAD_DIM / CV)
#define KT (HEAD_DIM / 16)        // k-steps of S
#define DT (HEAD_DIM / 8)         // 8-dim n-tiles of O, 16-byte chunks per tile row
#define ROWS (NW * 16)
#define BQ (ROWS / G)             // query tokens per CTA
#define PPT (HALF / 4)            // RoPE pairs a staging thread rotates
#define NGT (PPT / CK)            // key centroids per half it gathers (= its code bytes per half)
#define VPT (HEAD_DIM / 4)        // value channels a staging thread gathers
#define NGVP (VPT / CV)           // value centroids it gathers
#define LAZY_MAX 8.f
#define CB_BYTES (HEAD_DIM * 256 * 2)   // one codebook of one KV head: D channels x 256 centroids
#define TILE_BYTES (BN * HEAD_DIM * 2)  // one key or value tile

#if (PPT % CK) != 0 || (VPT % CV) != 0 || HEAD_DIM < 64 || (HEAD_DIM % 16) != 0 || G > 16 || (PPT % 4) != 0
#error "unsupported CQ prefill instance"
#endif

// the kernels' arguments (prefill_cuda.py passes them in this order)
#define CQ_PREFILL_PARAMS                                                                                       \
    const u16 *__restrict__ q,          /* [T, Hq, D] */                                                        \
        void *__restrict__ out,         /* [T, Hq, D] model dtype, or float32 partials [T, Hq, 1, D] */         \
        float *__restrict__ ml,         /* [T, Hq, 1, 2] (WINDOW_PARTIALS) */                                   \
        const u8 *__restrict__ cache,   /* [num_blocks, Hkv, block_size, slot_bytes] */                         \
        const u16 *__restrict__ kcb_g,  /* [Hkv * GK, 256, CK] */                                               \
        const u16 *__restrict__ vcb_g,  /* [Hkv * GV, 256, CV] */                                               \
        const int *__restrict__ block_table, const int *__restrict__ seq_lens, const int *__restrict__ qsl,     \
        const float *__restrict__ cos_sin, /* [max_pos, D]: cos | sin (>= BN rows) */                           \
        int num_seqs, i64 stride_qt, i64 stride_qh, i64 stride_ot, i64 stride_oh, i64 stride_cb, i64 stride_ch, \
        i64 stride_co, i64 stride_bt, i64 stride_cs, float qk_scale, int block_size, int v_offset, int win

__device__ __forceinline__ int tile_off(int j, int c);

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

template <int N>
__device__ __forceinline__ void sts_words(u8* tile, int j, int dim0, const u32* w) {
    static_assert(N % 8 == 0, "whole 16-byte chunks");
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
        *reinterpret_cast<uint4*>(tile + tile_off(j, dim0 / 8 + i)) =
            make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
}

// N code bytes (N a power of two) from an address aligned to min(N, 8) bytes, as 32-bit words
template <int N> struct Codes { u32 w[N >= 4 ? N / 4 : 1]; };

template <int N>
__device__ __forceinline__ void ldg_codes(const u8* p, Codes<N>& c) {
    if constexpr (N >= 8) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
            c.w[2 * i] = v.x;
            c.w[2 * i + 1] = v.y;
        }
    } else {
        c.w[0] = (u32)ldg_bytes<N>(p);
    }
}

template <int N>
__device__ __forceinline__ u32 code_of(const Codes<N>& c, int j) { return (c.w[j >> 2] >> (8 * (j & 3))) & 0xffu; }

// largest s in [0, num_seqs) with qsl[s] / BQ + s <= pid (every sequence owns at least one block)
__device__ __forceinline__ int find_seq(const int* qsl, int pid, int num_seqs) {
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (qsl[mid] / BQ + mid <= pid) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// One CTA's query block: its sequence, its tokens and the keys they see.
struct QueryBlock {
    int i_s, q_start, q_len, qb, ctx;
    int kv_hi;  // keys any row of the block sees
    int diag0;  // the last key the block's first token sees: tiles up to it are unmasked
};

// false: this CTA is past its sequence's blocks. Blocks of a sequence run last-first (the causal diagonal
// makes later blocks the longest, so they start in the first wave).
__device__ __forceinline__ bool query_block(const int* qsl, const int* seq_lens, int num_seqs, int win, QueryBlock& b) {
    const int pid = blockIdx.x;
    b.i_s = find_seq(qsl, pid, num_seqs);
    b.q_start = qsl[b.i_s];
    b.q_len = qsl[b.i_s + 1] - b.q_start;
    const int local = pid - (b.q_start / BQ + b.i_s), nqb = (b.q_len + BQ - 1) / BQ;
    if (local >= nqb) return false;
    b.qb = nqb - 1 - local;
    const int seq_len = seq_lens[b.i_s];
    b.ctx = seq_len - b.q_len;
    b.kv_hi = max(min(seq_len, b.ctx + (b.qb + 1) * BQ) - win, 0);
    b.diag0 = b.ctx + b.qb * BQ - win;
    return true;
}

// The code bytes of key t0 + sj (this thread's part sq), loaded into registers a tile ahead.
struct TileCodes {
    Codes<NGT> c1, c2;
    Codes<NGVP> cv;
    bool ok;
    const int* bt;
    const u8* head_base;

    __device__ __forceinline__ void fetch(int t0, int kv_hi, int sj, int sq, i64 stride_cb, i64 stride_co,
                                          int block_size, int v_offset) {
        const int n = t0 + sj;
        ok = n < kv_hi;
        if (ok) {
            const u8* slot = head_base + (i64)bt[n / block_size] * stride_cb + (i64)(n % block_size) * stride_co;
            ldg_codes<NGT>(slot + sq * NGT, c1);
            ldg_codes<NGT>(slot + GK / 2 + sq * NGT, c2);
            ldg_codes<NGVP>(slot + v_offset + sq * NGVP, cv);
        }
    }
};

// this head's codebooks into shared memory, 16 bytes per thread and load
__device__ __forceinline__ void stage_codebooks(u8* smem, const u16* kcb_g, const u16* vcb_g, int h) {
    const uint4* src_k = reinterpret_cast<const uint4*>(kcb_g + (i64)h * (GK * 256 * CK));
    const uint4* src_v = reinterpret_cast<const uint4*>(vcb_g + (i64)h * (GV * 256 * CV));
    uint4* dst = reinterpret_cast<uint4*>(smem);
    constexpr int n16 = CB_BYTES / 16;
    for (int i = threadIdx.x; i < n16; i += NT) {
        dst[i] = __ldg(src_k + i);
        dst[n16 + i] = __ldg(src_v + i);
    }
}

// rot[i][thread]: the pure rotation by sj positions of pairs 2i, 2i + 1 of its slice (cos, cos, sin, sin):
// row sj over row 0 (vLLM's scaled caches hold mscale * cos, mscale * sin)
__device__ __forceinline__ void stage_rotations(float4* rot, const float* cos_sin, i64 stride_cs, int sj, int sq) {
#pragma unroll
    for (int i = 0; i < PPT / 2; ++i) {
        const int p = sq * PPT + 2 * i;
        const float* r = cos_sin + (i64)sj * stride_cs;
        const float m0 = cos_sin[p], m1 = cos_sin[p + 1];
        rot[i * NT + threadIdx.x] = make_float4(r[p] / m0, r[p + 1] / m1, r[HALF + p] / m0, r[HALF + p + 1] / m1);
    }
}

// Rows gid and gid + 8 of warp `warp` (16 rows per warp): (token, head), query position (-1: padding row),
// and the query's A fragments (mma.sync m16n8k16 / wgmma m64nNk16 register layout, per warp)
struct QueryRows {
    int tok[2], head[2], pos[2];
    u32 qa[KT][4];

    __device__ __forceinline__ void load(const QueryBlock& b, const u16* q, i64 stride_qt, i64 stride_qh, int h,
                                         int warp, int gid, int tig) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = warp * 16 + gid + 8 * r;
            tok[r] = b.qb * BQ + row / G;
            head[r] = h * G + row % G;
            pos[r] = (row < BQ * G && tok[r] < b.q_len) ? b.ctx + tok[r] : -1;
        }
#pragma unroll
        for (int k = 0; k < KT; ++k) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const u16* qr = q + (i64)(b.q_start + tok[r]) * stride_qt + (i64)head[r] * stride_qh + 16 * k + 2 * tig;
                qa[k][r] = pos[r] >= 0 ? *reinterpret_cast<const u32*>(qr) : 0u;
                qa[k][2 + r] = pos[r] >= 0 ? *reinterpret_cast<const u32*>(qr + 8) : 0u;
            }
        }
    }
};

// Stage key t0 + sj of a tile: rotated key pairs [sq*PPT, (sq+1)*PPT), value channels [sq*VPT, (sq+1)*VPT).
// `bc` is the tile start's cos/sin row at this thread's slice. Keys past the block's visible ones (codes
// not ok) are stored as zeros: masked scores, and no stale NaN into P V.
__device__ __forceinline__ void stage_key(u8* ks, u8* vs, const u16* kcb, const u16* vcb, const TileCodes& tc,
                                          const float* bc, const float4* rot, int sj, int sq) {
    u32 y1[PPT / 2], y2[PPT / 2], vw[VPT / 2];
    if (tc.ok) {
        u32 w1[PPT / 2], w2[PPT / 2];
#pragma unroll
        for (int j = 0; j < NGT; ++j) {
            const int g1 = sq * NGT + j;
            lds_words<CK>(kcb + (g1 * 256 + code_of(tc.c1, j)) * CK, w1 + j * (CK / 2));
            lds_words<CK>(kcb + ((GK / 2 + g1) * 256 + code_of(tc.c2, j)) * CK, w2 + j * (CK / 2));
        }
#pragma unroll
        for (int j = 0; j < NGVP; ++j) {
            lds_words<CV>(vcb + ((sq * NGVP + j) * 256 + code_of(tc.cv, j)) * CV, vw + j * (CV / 2));
        }
#if HAS_ROPE
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
    } else {
#pragma unroll
        for (int i = 0; i < PPT / 2; ++i) y1[i] = y2[i] = 0u;
#pragma unroll
        for (int i = 0; i < VPT / 2; ++i) vw[i] = 0u;
    }
    sts_words<PPT>(ks, sj, sq * PPT, y1);
    sts_words<PPT>(ks, sj, HALF + sq * PPT, y2);
    sts_words<VPT>(vs, sj, sq * VPT, vw);
}

// One tile's raw scores s (rows gid: s[..][0..1], gid + 8: s[..][2..3]) -> the causal / window mask
// (diagonal tiles only), the online softmax with a lazily rescaled max (m_run in scaled log2 units;
// rescaling o when it moves), P packed as 16-bit A fragments for P V.
// With `alpha` (the overlapped ws form, whose P V of the previous tile is still accumulating into o):
// o is left alone and each row's rescale factor is returned there (1 when the max stays), for the
// caller to apply once that product is done.
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], u32 (&pa)[BN / 8][2], float (&m_run)[2],
                                               float (&l_run)[2], float (&o)[DT][4], const int (&pos)[2], int t0,
                                               int diag0, int win, int tig, float qk_scale,
                                               float* alpha = nullptr) {
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
        if (alpha != nullptr) alpha[r] = 1.f;
        if (mx[r] > m_run[r] + LAZY_MAX) {  // lazy: the max moves only past 2^LAZY_MAX (quad-uniform)
            const float a = exp2f(m_run[r] - mx[r]);
            l_run[r] *= a;
            if (alpha != nullptr) {
                alpha[r] = a;
            } else {
#pragma unroll
                for (int n = 0; n < DT; ++n) { o[n][2 * r] *= a; o[n][2 * r + 1] *= a; }
            }
            m_run[r] = mx[r];
        }
    }
    const float mu[2] = {m_run[0] == NEG_INF ? 0.f : m_run[0], m_run[1] == NEG_INF ? 0.f : m_run[1]};
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
}

// rows' sums over the quad; write (each thread: rows gid, gid + 8, dims 8n + 2tig, + 1): the output, or
// one segment of unnormalized partials and (max, sum) for the window merge
__device__ __forceinline__ void write_rows(const QueryBlock& b, const QueryRows& qr, float (&o)[DT][4],
                                           const float (&m_run)[2], float (&l_run)[2], void* out, float* ml,
                                           i64 stride_ot, i64 stride_oh, int hq, int tig) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
        if (qr.pos[r] < 0) continue;
        const i64 t = b.q_start + qr.tok[r];
#if WINDOW_PARTIALS
        const i64 pi = t * hq + qr.head[r];  // one segment
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
        u16* po = reinterpret_cast<u16*>(out) + t * stride_ot + (i64)qr.head[r] * stride_oh;
#pragma unroll
        for (int n = 0; n < DT; ++n) {
            *reinterpret_cast<u32*>(po + 8 * n + 2 * tig) = pack2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        }
#endif
    }
}

// The tile starts' cos/sin rows (HAS_ROPE) in two shared buffers of HEAD_DIM floats, moved by the
// threads < HEAD_DIM / 4: each tile's row lands in its buffer one tile ahead (before the barrier that
// precedes its staging) and is loaded from global memory two tiles ahead.
struct BaseRows {
    float4 next;

    // tile 0's row now, tile 1's into registers
    __device__ __forceinline__ void start(float* base, const float* cos_sin, i64 stride_cs, int kv_hi) {
        next = make_float4(0.f, 0.f, 0.f, 0.f);
        if (threadIdx.x < HEAD_DIM / 4) {
            reinterpret_cast<float4*>(base)[threadIdx.x] = *reinterpret_cast<const float4*>(cos_sin + 4 * threadIdx.x);
            if (BN < kv_hi) next = *reinterpret_cast<const float4*>(cos_sin + BN * stride_cs + 4 * threadIdx.x);
        }
    }

    // while tile t0 (buffer buf) stages: the next tile's row into the other buffer, the one after into registers
    __device__ __forceinline__ void advance(float* base, int buf, int t0, const float* cos_sin, i64 stride_cs,
                                            int kv_hi) {
        if (threadIdx.x < HEAD_DIM / 4) {
            reinterpret_cast<float4*>(base + (buf ^ 1) * HEAD_DIM)[threadIdx.x] = next;
            if (t0 + 2 * BN < kv_hi) {
                next = *reinterpret_cast<const float4*>(cos_sin + (i64)(t0 + 2 * BN) * stride_cs + 4 * threadIdx.x);
            }
        }
    }
};
