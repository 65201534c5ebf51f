// Decode attention over CQ codes with the codebooks resident in shared memory (issue 5).
//
// CUDA C++, compiled at first use by NVRTC (cuda_build.py); no CUDA headers (cq_common.cuh is this
// project's), so it builds anywhere NVRTC runs (CI compiles it for sm_90 on a CPU machine).
// Instantiated through -D macros:
//   G          query heads per KV head (<= 8: the rows of one m16 MMA tile, padded)
//   HEAD_DIM   16 | HEAD_DIM; CK, CV: channels per key / value centroid (8-bit codes)
//   NW         warps per CTA
//   ROPE_MODE  0: keys stored post-RoPE / no RoPE, 1: cos/sin rows read per key from vLLM's
//              cos_sin_cache, 2: the rows advanced by an 8-position rotation per key tile (re-read
//              every RESEED steps), 3: each key's cos/sin words read ready-packed in the model dtype
//              (`rope_packed`, decode_cuda.packed_rope: what mode 1 computes, half its bytes, no
//              conversions) a step ahead, in place of mode 2's 64 FMAs and 8 shared loads per step
//   IS_BF16    1: bfloat16 model, 0: float16
//   UNROLL     steps per unrolled main-loop body (lets the compiler drop the code pipeline's copies)
//   SLOT_BYTES, PAGE_SIZE, PAGE_SHIFT (optional): the page layout as constants (cq_common.cuh's
//              `layout_constants`), in place of the stride_co / block_size arguments
//   PERSISTENT 1: one CTA per SM and KV head loops over its head's (sequence, segment) items with the
//              codebooks staged once (grid (CTAs per head, 1, Hkv), two more arguments), instead of one
//              CTA per item; the warps' merge then has its own shared memory beside the codebooks
//
// Why this shape: Triton cannot index shared memory, so the Triton kernel gathers every centroid row
// from L1/L2, one dependent uncoalesced request per code group per key (the bound it hits). Here the
// K and V codebooks of one KV head (2 x 64 KB at head_dim 128, model dtype) are staged once per CTA
// and every centroid is one 16-byte shared-memory load.
//
// Layout (FlashAttention-2 style register pipeline, mma.sync m16n8k16, fp32 accumulation):
//   S = Q K^T: M = query rows of the GQA group (G <= 8, rows 8..15 zero), N = 8 keys, K = head dims in a
//     permuted order: lane quad member tig owns RoPE pairs [tig*PPT, (tig+1)*PPT), so a pair (p, p+HALF)
//     sits in one register (rotation in registers) and each thread gathers whole key centroids.
//   O^T = V^T P^T: M = head dims (thread gid owns dims [gid*VDT, (gid+1)*VDT)), N = query rows, K = 16
//     keys: P^T is the S accumulator of the two 8-key tiles as it stands (no shuffles), and each
//     thread gathers whole value centroid slices.
// Each warp walks its own contiguous share of the segment's 16-key steps with its own online softmax;
// the CTA merges its warps and writes one split-KV partial (acc, max, sum) that the Triton merge
// kernel (`varlen.merge_segments` or the window merge) combines.

#include "cq_common.cuh"

#define HALF (HEAD_DIM / 2)
#define GK (HEAD_DIM / CK)
#define GV (HEAD_DIM / CV)
#define KSTEPS (HEAD_DIM / 16)   // k-steps of S = Q K^T, m-tiles of O^T = V^T P^T
#define PPT (HALF / 4)           // RoPE pairs per quad member
#define NGT (PPT / CK)           // key groups per thread in each half of the head
#define VDT (HEAD_DIM / 8)       // value dims per thread
#define VLEN (VDT < CV ? VDT : CV)  // value channels gathered per chunk
#define NGV (VDT / VLEN)         // value chunks (code bytes) per key and thread
#define RESEED 64                // ROPE_MODE 2: steps between re-reads of the cos/sin rows
#define LAZY_MAX 8.f             // log2 headroom of the lazily rescaled running max
// The layout-constant build (SLOT_BYTES given) also loads the pipeline's next codes and cos/sin words on
// every step, past the warp's last step too (page 0 of the head and a clamped row: valid memory, never
// used): without the guard the compiler renames the pipeline's registers across the unrolled steps
// instead of copying them (cq1: 380 -> 338 SASS instructions per 16-key step, 245 registers).
#ifdef SLOT_BYTES
#define STEADY_LOADS 1
#else
#define STEADY_LOADS 0
#endif
#ifndef PERSISTENT
#define PERSISTENT 0
#endif

#if (PPT % CK) != 0 || (HALF % 8) != 0 || G > 8 || (VDT % VLEN) != 0
#error "unsupported CQ decode instance"
#endif
#if ROPE_MODE == 3 && (KSTEPS % 2) != 0
#error "ROPE_MODE 3 reads each thread's 2 * KSTEPS words as 16-byte vectors"
#endif

typedef typename CodeWord<NGT>::T KCodes;
typedef typename CodeWord<NGV>::T VCodes;

// A 16-key step's code bytes for this thread: keys gid and 8 + gid (for S), and keys 2tig, 2tig+1,
// 2tig+8, 2tig+9 (for O).
struct Codes {
    KCodes k[2][2];  // [n-tile][half of the head]
    VCodes v[4];
};

__device__ __forceinline__ void load_codes(
    Codes& c, const u8* step_base, i64 stride_co, int gid, int tig, int v_byte) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
        const u8* slot = step_base + (i64)(nt * 8 + gid) * stride_co;
        c.k[nt][0] = ldg_bytes<NGT>(slot + tig * NGT);
        c.k[nt][1] = ldg_bytes<NGT>(slot + GK / 2 + tig * NGT);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int key = 2 * tig + (j & 1) + (j >> 1) * 8;
        c.v[j] = ldg_bytes<NGV>(step_base + (i64)key * stride_co + v_byte);
    }
}

__device__ __forceinline__ void load_rope(
    const float* __restrict__ cs, i64 stride_cs, int pos, int tig, float* cs_c, float* cs_s) {
    const float* row = cs + (i64)pos * stride_cs + tig * PPT;
#pragma unroll
    for (int i = 0; i < PPT; i += 4) {
        float4 c = __ldg(reinterpret_cast<const float4*>(row + i));
        float4 s = __ldg(reinterpret_cast<const float4*>(row + HALF + i));
        cs_c[i] = c.x; cs_c[i + 1] = c.y; cs_c[i + 2] = c.z; cs_c[i + 3] = c.w;
        cs_s[i] = s.x; cs_s[i + 1] = s.y; cs_s[i + 2] = s.z; cs_s[i + 3] = s.w;
    }
}

// ROPE_MODE 3: this thread's packed words of position `pos`: KSTEPS cos words, then KSTEPS sin words
// (row layout [4 quad members][cos | sin][KSTEPS], decode_cuda.packed_rope)
__device__ __forceinline__ void load_rope_packed(u32* w, const u32* __restrict__ rp, i64 stride_rp, int pos, int tig) {
    const uint4* row = reinterpret_cast<const uint4*>(rp + (i64)pos * stride_rp + tig * 2 * KSTEPS);
#pragma unroll
    for (int i = 0; i < KSTEPS / 2; ++i) {
        const uint4 v = __ldg(row + i);
        w[4 * i] = v.x;
        w[4 * i + 1] = v.y;
        w[4 * i + 2] = v.z;
        w[4 * i + 3] = v.w;
    }
}

// S[gid][2tig, 2tig+1] for one 8-key tile: this thread supplies key gid's B fragment, receives the
// scores of keys 2tig and 2tig+1. MMA k order: k-step k takes dims (tig*PPT + 2k, +1) in its low columns
// and their RoPE partners (HALF + tig*PPT + 2k, +1) in its high ones, so a centroid word (two adjacent
// channels) is one B register as gathered, and the rotation runs on packed pairs: y1 = x1 c - x2 s,
// y2 = x2 c + x1 s with (cw, sw, nsw) = packed cos, sin, -sin of the key's position.
__device__ __forceinline__ void qk_tile(
    float* s, const u32 (*qt)[4], const u16* kcb, const KCodes* kcodes, int tig, const u32* cw, const u32* sw,
    const u32* nsw) {
    u32 w1[KSTEPS], w2[KSTEPS];  // first- and second-half centroid words of this thread's pairs
#pragma unroll
    for (int j = 0; j < NGT; ++j) {
        const int g1 = tig * NGT + j;
        lds_words<CK>(kcb + ((g1 * 256 + (int)code_at(kcodes[0], j)) * CK), w1 + j * (CK / 2));
        lds_words<CK>(kcb + (((GK / 2 + g1) * 256 + (int)code_at(kcodes[1], j)) * CK), w2 + j * (CK / 2));
    }
    float acc[2][4] = {};  // even and odd k-steps: two MMA dependency chains of half the length
#pragma unroll
    for (int k = 0; k < KSTEPS; ++k) {
#if ROPE_MODE == 0
        mma16816(acc[k & 1], qt[k][0], qt[k][1], qt[k][2], qt[k][3], w1[k], w2[k]);
#else
        const u32 y1 = fma2(w1[k], cw[k], fma2(w2[k], nsw[k], 0u));
        const u32 y2 = fma2(w2[k], cw[k], fma2(w1[k], sw[k], 0u));
        mma16816(acc[k & 1], qt[k][0], qt[k][1], qt[k][2], qt[k][3], y1, y2);
#endif
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] = acc[0][i] + acc[1][i];
}

// Rotations in shared memory, [2][4][PPT + 4] (cos | sin, per quad member, padded so the four members'
// float4 reads hit distinct banks)
#define ROT_ROW (PPT + 4)
__device__ __forceinline__ const float* rot_at(const float* rot, int sc, int t) { return rot + (sc * 4 + t) * ROT_ROW; }

// (c, s) of this thread's pairs advanced by the rotation `rot` (16 positions)
__device__ __forceinline__ void rope_advance(float* c, float* s, const float* rot, int tig) {
#pragma unroll
    for (int i = 0; i < PPT; i += 4) {
        const float4 dc = *reinterpret_cast<const float4*>(rot_at(rot, 0, tig) + i);
        const float4 ds = *reinterpret_cast<const float4*>(rot_at(rot, 1, tig) + i);
        const float dcs[4] = {dc.x, dc.y, dc.z, dc.w}, dss[4] = {ds.x, ds.y, ds.z, ds.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float cn = c[i + j] * dcs[j] - s[i + j] * dss[j];
            s[i + j] = s[i + j] * dcs[j] + c[i + j] * dss[j];
            c[i + j] = cn;
        }
    }
}

// packed (cos, sin, -sin) words of this thread's pairs in the MMA k order
__device__ __forceinline__ void pack_rope(const float* c, const float* s, u32* cw, u32* sw, u32* nsw) {
#pragma unroll
    for (int k = 0; k < KSTEPS; ++k) {
        cw[k] = pack2(c[2 * k], c[2 * k + 1]);
        sw[k] = pack2(s[2 * k], s[2 * k + 1]);
        nsw[k] = sw[k] ^ 0x80008000u;
    }
}

extern "C" __global__ void __launch_bounds__(NW * 32, 1) cq_decode_kernel(
    const u16* __restrict__ q,        // [T, Hq, D]
    float* __restrict__ part,         // [T, Hq, S, D] float32
    float* __restrict__ ml,           // [T, Hq, S, 2]
    const u8* __restrict__ cache,     // [num_blocks, Hkv, block_size, slot_bytes]
    const u16* __restrict__ kcb_g,    // [Hkv * GK, 256, CK]
    const u16* __restrict__ vcb_g,    // [Hkv * GV, 256, CV]
    const int* __restrict__ block_table,  // [num_seqs, max_blocks]
    const int* __restrict__ seq_lens,     // [num_seqs]
    const int* __restrict__ qsl,          // [num_seqs + 1]
    const float* __restrict__ cos_sin,    // [max_pos, D]: cos | sin
    i64 stride_qt, i64 stride_qh, i64 stride_cb, i64 stride_ch, i64 stride_co, i64 stride_bt,
    i64 stride_cs, int rope_rows, float qk_scale, int block_size, int log2_block_size, int v_offset, int win,
    const u32* __restrict__ rope_packed,  // ROPE_MODE 3: [rope_rows, HALF] words (else unused)
    i64 stride_rp
#if PERSISTENT
    , int num_seqs, int num_segments  // the items: num_seqs * num_segments per KV head
#endif
    ) {
    extern __shared__ __align__(16) u8 smem[];
    u16* kcb = reinterpret_cast<u16*>(smem);
    u16* vcb = kcb + GK * 256 * CK;
    __shared__ float red_m[NW][8];
    __shared__ float red_l[NW][8];

    layout_constants(stride_co, block_size);
#ifdef PAGE_SHIFT
    log2_block_size = PAGE_SHIFT;
#endif
#if !PERSISTENT
    const int seg = blockIdx.x, num_segments = gridDim.x;
    const int i_s = blockIdx.y;
#endif
    const int h = blockIdx.z, hq = gridDim.z * G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;

#if !PERSISTENT
    const int q_start = qsl[i_s];
    if (qsl[i_s + 1] - q_start < 1) return;  // no token (padded batch entry)
    const int seq_len = seq_lens[i_s];
    const int kv_len = max(seq_len - win, 0);  // decode: one query at position seq_len - 1
#endif

    // stage this head's codebooks (model dtype), 16 bytes per thread and load
    {
        const uint4* src_k = reinterpret_cast<const uint4*>(kcb_g + (i64)h * (GK * 256 * CK));
        const uint4* src_v = reinterpret_cast<const uint4*>(vcb_g + (i64)h * (GV * 256 * CV));
        uint4* dst = reinterpret_cast<uint4*>(smem);
        constexpr int n16 = HEAD_DIM * 256 * 2 / 16;  // each codebook: D * 256 values of 2 bytes
        for (int i = threadIdx.x; i < n16; i += NW * 32) {
            dst[i] = __ldg(src_k + i);
            dst[n16 + i] = __ldg(src_v + i);
        }
    }

#if ROPE_MODE != 0
    // pure rotations by 8 and 16 positions: rows 8 and 16 over row 0 (vLLM's scaled caches hold
    // mscale * cos, mscale * sin; the rows read per key keep their mscale)
    __shared__ __align__(16) float rot8[2 * 4 * ROT_ROW], rot16[2 * 4 * ROT_ROW];
    for (int i = threadIdx.x; i < HALF; i += NW * 32) {
        const float m0 = cos_sin[i];
        const int t = i / PPT, j = i % PPT;
        rot8[(0 * 4 + t) * ROT_ROW + j] = cos_sin[8 * stride_cs + i] / m0;
        rot8[(1 * 4 + t) * ROT_ROW + j] = cos_sin[8 * stride_cs + HALF + i] / m0;
        rot16[(0 * 4 + t) * ROT_ROW + j] = cos_sin[16 * stride_cs + i] / m0;
        rot16[(1 * 4 + t) * ROT_ROW + j] = cos_sin[16 * stride_cs + HALF + i] / m0;
    }
#endif
    __syncthreads();  // codebooks and rotations staged

#if PERSISTENT
    // this CTA's items of head h, in turn (the body below, not indented, is one item's attention)
    float* red_o = reinterpret_cast<float*>(smem + 2 * HEAD_DIM * 256 * 2);  // [NW][8][D] after the codebooks
    for (int item = blockIdx.x; item < num_seqs * num_segments; item += gridDim.x) {
    const int seg = item % num_segments, i_s = item / num_segments;
    const int q_start = qsl[i_s];
    if (qsl[i_s + 1] - q_start < 1) continue;  // no token (padded batch entry); uniform over the CTA
    const int seq_len = seq_lens[i_s];
    const int kv_len = max(seq_len - win, 0);
#endif
    // Query fragments in qk_tile's k order. The second 8-key tile of a step sits 8 positions after the
    // first: q . R(n + 8) k = (R(-8) q) . (R(n) k), so rows gid + 8 of the MMA's A tile hold the query
    // rotated by -8 positions: one A tile for both key tiles (the first tile's scores come from rows gid,
    // the second's from rows gid + 8) and one cos/sin per step.
    u32 qt[KSTEPS][4];
    {
        const u16* qr = q + (i64)q_start * stride_qt + (i64)(h * G + gid) * stride_qh;
#pragma unroll
        for (int k = 0; k < KSTEPS; ++k) {
            const int p = tig * PPT + 2 * k;
            const u32 w1 = gid < G ? *reinterpret_cast<const u32*>(qr + p) : 0u;
            const u32 w2 = gid < G ? *reinterpret_cast<const u32*>(qr + HALF + p) : 0u;
            qt[k][0] = w1;
            qt[k][2] = w2;
#if ROPE_MODE == 0
            qt[k][1] = w1;
            qt[k][3] = w2;
#else
            const float* c8 = rot_at(rot8, 0, tig) + 2 * k;
            const float* s8 = rot_at(rot8, 1, tig) + 2 * k;
            const float x1l = lo_f(w1), x1h = hi_f(w1), x2l = lo_f(w2), x2h = hi_f(w2);
            qt[k][1] = pack2(x1l * c8[0] + x2l * s8[0], x1h * c8[1] + x2h * s8[1]);
            qt[k][3] = pack2(x2l * c8[0] - x1l * s8[0], x2h * c8[1] - x1h * s8[1]);
#endif
        }
    }

    // this warp's share of this segment's 16-key steps
    const int steps = (kv_len + 15) / 16;
    const int per_seg = (steps + num_segments - 1) / num_segments;
    const int seg_lo = min(seg * per_seg, steps), seg_hi = min(seg_lo + per_seg, steps);
    const int per_warp = (seg_hi - seg_lo + NW - 1) / NW;
    const int st_lo = min(seg_lo + warp * per_warp, seg_hi), st_hi = min(st_lo + per_warp, seg_hi);

    const int* bt = block_table + (i64)i_s * stride_bt;
    const u8* head_base = cache + (i64)h * stride_ch;
    const int v_byte = v_offset + (gid * VDT) / CV;
    const int v_off = (gid * VDT) % CV;  // channel offset inside the value centroid (VDT < CV)

    float o[KSTEPS][4];
#pragma unroll
    for (int k = 0; k < KSTEPS; ++k) o[k][0] = o[k][1] = o[k][2] = o[k][3] = 0.f;
    float m_run = NEG_INF, l_run = 0.f;

    constexpr int CS_N = (ROPE_MODE == 1 || ROPE_MODE == 2) ? PPT : 1;
    float cs_c[CS_N], cs_s[CS_N];  // cos/sin of position n0 + gid (fp32)
    u32 cw[KSTEPS], sw[KSTEPS], nsw[KSTEPS];
#if ROPE_MODE == 3
    u32 rp_next[2 * KSTEPS];  // the next step's packed words, loaded a step ahead like its codes
    if (st_lo < st_hi) load_rope_packed(rp_next, rope_packed, stride_rp, min(st_lo * 16 + gid, rope_rows - 1), tig);
#endif

    // Software pipeline over the steps: the page of step st + 3 and the codes of step st + 2 are in
    // flight while step st computes (page -> codes is a dependent pair of loads; one step ahead left
    // every warp waiting on it).
    auto page_of = [&](int st) -> i64 { return st < st_hi ? (i64)bt[(st * 16) >> log2_block_size] : 0; };
    auto step_base = [&](int st, i64 blk) -> const u8* {
        return head_base + blk * stride_cb + (i64)((st * 16) & (block_size - 1)) * stride_co;
    };
    Codes cur, nxt, nxt2;
    i64 pg2 = 0, pg3 = 0;
    if (st_lo < st_hi) {
        load_codes(cur, step_base(st_lo, page_of(st_lo)), stride_co, gid, tig, v_byte);
        if (st_lo + 1 < st_hi) load_codes(nxt, step_base(st_lo + 1, page_of(st_lo + 1)), stride_co, gid, tig, v_byte);
        pg2 = page_of(st_lo + 2);
    }

#pragma unroll UNROLL
    for (int st = st_lo; st < st_hi; ++st) {
        if (STEADY_LOADS || st + 2 < st_hi) load_codes(nxt2, step_base(st + 2, pg2), stride_co, gid, tig, v_byte);
        pg3 = page_of(st + 3);
        const int n0 = st * 16;

        // scores of keys n0 + {2tig, 2tig+1} (s0) and n0 + 8 + {2tig, 2tig+1} (s1), row gid
        float s0[4], s1[4];
#if ROPE_MODE == 1
        load_rope(cos_sin, stride_cs, min(n0 + gid, rope_rows - 1), tig, cs_c, cs_s);
        pack_rope(cs_c, cs_s, cw, sw, nsw);
#elif ROPE_MODE == 2
        if ((st - st_lo) % RESEED == 0) load_rope(cos_sin, stride_cs, min(n0 + gid, rope_rows - 1), tig, cs_c, cs_s);
        pack_rope(cs_c, cs_s, cw, sw, nsw);
        rope_advance(cs_c, cs_s, rot16, tig);
#elif ROPE_MODE == 3
#pragma unroll
        for (int k = 0; k < KSTEPS; ++k) {
            cw[k] = rp_next[k];
            sw[k] = rp_next[KSTEPS + k];
            nsw[k] = sw[k] ^ 0x80008000u;
        }
        if (STEADY_LOADS || st + 1 < st_hi)
            load_rope_packed(rp_next, rope_packed, stride_rp, min(n0 + 16 + gid, rope_rows - 1), tig);
#endif
        qk_tile(s0, qt, kcb, cur.k[0], tig, cw, sw, nsw);
        qk_tile(s1, qt, kcb, cur.k[1], tig, cw, sw, nsw);
        float p[4] = {s0[0], s0[1], s1[2], s1[3]};  // rows gid (query) of tile 0, gid + 8 (rotated query) of tile 1
        float mx = NEG_INF;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + 2 * tig + (j & 1) + (j >> 1) * 8;
            p[j] = n < kv_len ? p[j] * qk_scale : NEG_INF;
            mx = fmaxf(mx, p[j]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Lazy rescaling (as FlashAttention-4 does): the running max moves only when a tile's max passes
        // it by more than LAZY_MAX (log2 units), so most steps skip the rescale and its shuffles. Exact:
        // the sums and the accumulator share the stale max; p <= 2^LAZY_MAX stays far inside bf16 range.
        if (__any_sync(0xffffffffu, mx > m_run + LAZY_MAX)) {
            const float m_new = mx > m_run + LAZY_MAX ? mx : m_run;
            const float alpha = exp2f(m_run - (m_new == NEG_INF ? 0.f : m_new));
            l_run *= alpha;
            m_run = m_new;
            const float a_lo = __shfl_sync(0xffffffffu, alpha, (2 * tig) * 4);  // rows 2tig, 2tig+1 of O^T
            const float a_hi = __shfl_sync(0xffffffffu, alpha, (2 * tig + 1) * 4);
#pragma unroll
            for (int k = 0; k < KSTEPS; ++k) {
                o[k][0] *= a_lo; o[k][1] *= a_hi; o[k][2] *= a_lo; o[k][3] *= a_hi;
            }
        }
        const float m_use = m_run == NEG_INF ? 0.f : m_run;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            p[j] = exp2f(p[j] - m_use);
            l_run += p[j];
        }
        const u32 pb0 = pack2(p[0], p[1]), pb1 = pack2(p[2], p[3]);

        // value slices of keys 2tig, 2tig+1, 2tig+8, 2tig+9: dims [gid*VDT, (gid+1)*VDT)
        u32 vw[4][VDT / 2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int c = 0; c < NGV; ++c) {
                const int g = (gid * VDT) / CV + c;
                lds_words<VLEN>(vcb + ((g * 256 + (int)code_at(cur.v[j], c)) * CV + v_off), vw[j] + c * (VLEN / 2));
            }
        }
#pragma unroll
        for (int k = 0; k < KSTEPS; ++k) {  // m-tile k: dims gid*VDT + k (rows gid) and + KSTEPS + k (rows gid+8)
            const u32 sel = (k & 1) ? 0x7632u : 0x5410u;
            const int wl = k / 2, wh = (KSTEPS + k) / 2;
            const u32 a0 = __byte_perm(vw[0][wl], vw[1][wl], sel);
            const u32 a1 = __byte_perm(vw[0][wh], vw[1][wh], sel);
            const u32 a2 = __byte_perm(vw[2][wl], vw[3][wl], sel);
            const u32 a3 = __byte_perm(vw[2][wh], vw[3][wh], sel);
            mma16816(o[k], a0, a1, a2, a3, pb0, pb1);
        }
        cur = nxt;
        nxt = nxt2;
        pg2 = pg3;
    }

    // merge the warps: row sums over the quad, then (max, sum, acc) per warp through shared memory
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
    __syncthreads();  // everyone is done with the codebooks: reuse their space for the accumulators (PERSISTENT:
                      // the merge's own space, the codebooks stay)
#if !PERSISTENT
    float* red_o = reinterpret_cast<float*>(smem);  // [NW][8][D]
#endif
    if (tig == 0) {
        red_m[warp][gid] = m_run;
        red_l[warp][gid] = l_run;
    }
#pragma unroll
    for (int k = 0; k < KSTEPS; ++k) {
        const int d_lo = gid * VDT + k, d_hi = gid * VDT + KSTEPS + k;
        float* r0 = red_o + (warp * 8 + 2 * tig) * HEAD_DIM;
        float* r1 = r0 + HEAD_DIM;
        r0[d_lo] = o[k][0]; r1[d_lo] = o[k][1];
        r0[d_hi] = o[k][2]; r1[d_hi] = o[k][3];
    }
    __syncthreads();
    const int t = q_start;
    for (int idx = threadIdx.x; idx < G * HEAD_DIM; idx += NW * 32) {
        const int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float m_all = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) m_all = fmaxf(m_all, red_m[w][r]);
        const float m_use = m_all == NEG_INF ? 0.f : m_all;
        float acc = 0.f, l = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float sc = exp2f(red_m[w][r] - m_use);
            acc += sc * red_o[(w * 8 + r) * HEAD_DIM + d];
            l += sc * red_l[w][r];
        }
        const i64 pi = ((i64)t * hq + h * G + r) * num_segments + seg;
        part[pi * HEAD_DIM + d] = acc;
        if (d == 0) {
            ml[pi * 2] = m_all;
            ml[pi * 2 + 1] = l;
        }
    }
#if PERSISTENT
    __syncthreads();  // red_o, red_m and red_l read before the next item's merge writes them
    }
#endif
}
