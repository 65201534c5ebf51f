// Prefill / chunked-prefill attention over CQ codes, warp-specialized Hopper form (sm_90a; issue 5).
// Opt-in (VLLM_CQ_PREFILL_KERNEL=ws).
//
// Why: prefill_wgmma.cu measured about 4,600 cycles per 64-key tile on the H200 against about 1,650 issue
// cycles (826 SASS instructions per warp, 2 warps per scheduler) and about 1,000 tensor cycles: its warps
// stage a tile, wait for S, run the softmax, wait for P V and meet at a CTA barrier, each step waiting on
// the last. Here the roles split, as in FlashAttention-3:
//   warpgroups 0, 1 (producers, 72 registers): stage tile i + 1 (gather, rotate, store) while the
//     consumers compute tile i, signalling `full[stage]` through an mbarrier, and restage a buffer once
//     the consumers release it (`empty[stage]`); thread 4 sj + sq stages part sq of key sj, its code bytes
//     loaded a tile ahead, the tile-start cos/sin row read from the global cache (L1);
//   warpgroups 2, 3 (consumers, 184 registers, 64 rows each): S = Q K^T and O += P V by wgmma and the
//     online softmax, no CTA barrier inside the loop, so one warpgroup's softmax overlaps the other's
//     products.
// 2 x 72 + 2 x 184 = 4 x 128 registers: the budget __launch_bounds__(512, 1) gives at entry, redistributed
// by setmaxnreg (a larger sum makes the consumers' setmaxnreg.inc wait forever). ptxas (NVRTC 13.5): at
// most 8 bytes of spills (cq2/cq4 with RoPE at head_dim 128). Tile layout, descriptors, products, softmax
// and epilogue are prefill_wgmma.cu's (wgmma.cuh, prefill_common.cuh); the staging is the same arithmetic
// as `stage_key`, one 16-byte chunk at a time so that it fits the producers' registers.
//
// History: the first form (one producer warpgroup of 128 threads staging keys sj and sj + 32, 216-register
// consumers) passed every prefill test on the H200 (2026-12-03) but was not faster than the wgmma form
// (8K causal cq1 2.55 vs 2.51 ms, cq4 3.18 vs 2.80). ncu: the top stall was the producer's L1TEX
// scoreboard (35% of the cycles between its instructions): one producer warp per scheduler, and key
// sj + 32's code bytes were loaded right before their staging (block table, then the slot: two dependent
// global loads per tile) instead of a tile ahead. This form doubles the producers and keeps every code
// load a tile ahead: all prefill tests pass on the H200 and it is 14-24% faster than wgmma per launch
// (8K causal cq1 1.90 vs 2.50 ms, cq4 2.40 vs 2.79; 2026-12-03, ninth session). WS_OVERLAP (the "wso"
// form) adds intra-warpgroup pipelining to the consumers; it has not run on a GPU yet.

#include "prefill_common.cuh"
#include "wgmma.cuh"

#define NT_WS (2 * NT)  // two producer warpgroups + two consumer warpgroups
#define PRODUCER_REGS 72
#define CONSUMER_REGS 184

#if CK > 8
#error "the producer stages key centroids of at most 8 channels"
#endif
#ifndef WS_OVERLAP
#define WS_OVERLAP 0  // 1: the "wso" form (prefill_cuda.FORMS), scores of the next tile during P V
#endif
// 1: the "wsp" form: `cos_sin` is decode_cuda.packed_rope's table (int32 words [rows, HEAD_DIM / 2],
// stride_cs in words), each key's cos/sin words read ready-packed in the model dtype (two 16-byte loads
// per chunk) and the key rotated on packed pairs exactly as the decode kernel's ROPE_MODE 3 does, in
// place of the fp32 rotation from the tile start's row and the per-thread rotation table (about 30
// instructions per word, 12 shared and global loads per chunk). No rotation table in shared memory.
#ifndef ROPE_PACKED
#define ROPE_PACKED 0
#endif
#define PACKED_ROTATION (HAS_ROPE && ROPE_PACKED)

__device__ __forceinline__ void mbar_init(u64* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [%0]; }" ::"r"(smem_u32(bar)) : "memory");
}

// wait until the barrier's phase of this parity has completed (phase k of a barrier has parity k & 1)
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {
    asm volatile(
        "{ .reg .pred done;\n"
        "WS_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WS_WAIT;\n}" ::"r"(smem_u32(bar)),
        "r"(parity)
        : "memory");
}

// 16-byte chunk c of tile row j: the staged values of 8 channels
__device__ __forceinline__ void sts_chunk(u8* tile, int j, int c, const u32* w) {
    *reinterpret_cast<uint4*>(tile + tile_off(j, c)) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Key sj of a tile (part sq; this thread's rotation table slot, as in `stage_key`): the same values as
// `stage_key`, chunk by chunk.
// `bc`: the tile start's cos/sin row at this thread's slice (global memory; HAS_ROPE), or with
// PACKED_ROTATION the key's own row of packed words at this thread's slice (PPT / 2 cos, then PPT / 2 sin).
__device__ __forceinline__ void stage_key_chunked(u8* ks, u8* vs, const u16* kcb, const u16* vcb,
                                                  const TileCodes& tc, const float* bc, const float4* rot, int sj,
                                                  int sq) {
    const u32 zero[4] = {0u, 0u, 0u, 0u};
    if (!tc.ok) {  // past the block's visible keys: zeros (masked scores, no stale NaN into P V)
#pragma unroll
        for (int c = 0; c < PPT / 8; ++c) {
            sts_chunk(ks, sj, sq * PPT / 8 + c, zero);
            sts_chunk(ks, sj, (HALF + sq * PPT) / 8 + c, zero);
        }
#pragma unroll
        for (int c = 0; c < VPT / 8; ++c) sts_chunk(vs, sj, sq * VPT / 8 + c, zero);
        return;
    }
    // keys: chunk c of the slice in each half (pairs 8c .. 8c + 7), 8 / CK centroids per chunk
#pragma unroll
    for (int c = 0; c < PPT / 8; ++c) {
        u32 w1[4], w2[4];
#pragma unroll
        for (int j = 0; j < 8 / CK; ++j) {
            const int g = c * (8 / CK) + j, g1 = sq * NGT + g;
            lds_words<CK>(kcb + (g1 * 256 + code_of(tc.c1, g)) * CK, w1 + j * (CK / 2));
            lds_words<CK>(kcb + ((GK / 2 + g1) * 256 + code_of(tc.c2, g)) * CK, w2 + j * (CK / 2));
        }
#if PACKED_ROTATION
        const uint4 cv4 = __ldg(reinterpret_cast<const uint4*>(bc) + c);                // cos words 4c .. 4c + 3
        const uint4 sv4 = __ldg(reinterpret_cast<const uint4*>(bc) + PPT / 8 + c);      // sin words
        const u32 cw[4] = {cv4.x, cv4.y, cv4.z, cv4.w}, sw[4] = {sv4.x, sv4.y, sv4.z, sv4.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // y1 = x1 c - x2 s, y2 = x2 c + x1 s on packed pairs (decode's qk_tile)
            const u32 y1 = fma2(w1[k], cw[k], fma2(w2[k], sw[k] ^ 0x80008000u, 0u));
            const u32 y2 = fma2(w2[k], cw[k], fma2(w1[k], sw[k], 0u));
            w1[k] = y1;
            w2[k] = y2;
        }
#elif HAS_ROPE
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // word k: pairs 8c + 2k, + 1 (the tile row's cos and sin of both)
            const float2 cb = __ldg(reinterpret_cast<const float2*>(bc + 8 * c + 2 * k));
            const float2 sb = __ldg(reinterpret_cast<const float2*>(bc + HALF + 8 * c + 2 * k));
            const float4 r = rot[(4 * c + k) * NT + threadIdx.x];
            const float c0 = cb.x * r.x - sb.x * r.z, s0 = sb.x * r.x + cb.x * r.z;
            const float c1f = cb.y * r.y - sb.y * r.w, s1 = sb.y * r.y + cb.y * r.w;
            const float a1 = lo_f(w1[k]), b1 = hi_f(w1[k]), a2 = lo_f(w2[k]), b2 = hi_f(w2[k]);
            w1[k] = pack2(a1 * c0 - a2 * s0, b1 * c1f - b2 * s1);
            w2[k] = pack2(a2 * c0 + a1 * s0, b2 * c1f + b1 * s1);
        }
#endif
        sts_chunk(ks, sj, sq * PPT / 8 + c, w1);
        sts_chunk(ks, sj, (HALF + sq * PPT) / 8 + c, w2);
    }
    // values: VPT channels from sq * VPT, 8 at a time (a 16-channel centroid is two chunks)
#if CV <= 8
#pragma unroll
    for (int c = 0; c < VPT / 8; ++c) {
        u32 w[4];
#pragma unroll
        for (int j = 0; j < 8 / CV; ++j) {
            const int g = c * (8 / CV) + j;
            lds_words<CV>(vcb + ((sq * NGVP + g) * 256 + code_of(tc.cv, g)) * CV, w + j * (CV / 2));
        }
        sts_chunk(vs, sj, sq * VPT / 8 + c, w);
    }
#else
#pragma unroll
    for (int g = 0; g < NGVP; ++g) {
#pragma unroll
        for (int c = 0; c < CV / 8; ++c) {
            u32 w[4];
            lds_words<8>(vcb + ((sq * NGVP + g) * 256 + code_of(tc.cv, g)) * CV + 8 * c, w);
            sts_chunk(vs, sj, (sq * VPT + g * CV) / 8 + c, w);
        }
    }
#endif
}

extern "C" __global__ void __launch_bounds__(NT_WS, 1) cq_prefill_ws_kernel(CQ_PREFILL_PARAMS) {
    layout_constants(stride_co, block_size);
    extern __shared__ __align__(1024) u8 smem[];
    __shared__ u64 full[2], empty[2];  // per tile buffer: staged (producer -> consumers), read (back)
    u16* kcb = reinterpret_cast<u16*>(smem);
    u16* vcb = kcb + GK * 256 * CK;
    u8* tiles = smem + 2 * CB_BYTES;  // [2 buffers][keys, values][TILE_BYTES], 1024-byte aligned
#if HAS_ROPE && !ROPE_PACKED
    float4* rot = reinterpret_cast<float4*>(tiles + 4 * TILE_BYTES);  // [PPT / 2][NT]: slot sj * 4 + sq
#else
    const float4* rot = nullptr;
#endif
    if (smem_u32(tiles) & 1023) __trap();  // the swizzle is on address bits: tiles must start on 1024 bytes

    const int h = blockIdx.y, hq = gridDim.y * G;
    QueryBlock b;
    if (!query_block(qsl, seq_lens, num_seqs, win, b)) return;  // uniform over the CTA
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;

    if (threadIdx.x == 0) {
        mbar_init(&full[0], NT);
        mbar_init(&full[1], NT);
        mbar_init(&empty[0], NT);
        mbar_init(&empty[1], NT);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (threadIdx.x < NT) {  // the 256-slot layouts of prefill_common.cuh
        stage_codebooks(smem, kcb_g, vcb_g, h);
#if HAS_ROPE && !ROPE_PACKED
        stage_rotations(rot, cos_sin, stride_cs, threadIdx.x >> 2, threadIdx.x & 3);
#endif
    }
    __syncthreads();  // codebooks, rotations, barriers

    if (warp < NW) {  // producer warpgroups: thread 4 sj + sq stages part sq of key sj (prefill_common's slots)
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
        const int sj = threadIdx.x >> 2, sq = threadIdx.x & 3;
        TileCodes tc;  // the next tile's code bytes, loaded a tile ahead
        tc.bt = block_table + (i64)b.i_s * stride_bt;
        tc.head_base = cache + (i64)h * stride_ch;
        tc.fetch(0, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
        for (int i = 0, t0 = 0; t0 < b.kv_hi; ++i, t0 += BN) {
            const int st = i & 1;
            if (i >= 2) mbar_wait(&empty[st], ((i >> 1) + 1) & 1);  // tile i - 2 read from this buffer
            u8* kt = tiles + st * (2 * TILE_BYTES);
#if PACKED_ROTATION  // key t0 + sj's words (read only for visible keys, which are within the table)
            const float* bc = cos_sin + (i64)(t0 + sj) * stride_cs + sq * PPT;
#else
            const float* bc = HAS_ROPE ? cos_sin + (i64)t0 * stride_cs + sq * PPT : nullptr;
#endif
            stage_key_chunked(kt, kt + TILE_BYTES, kcb, vcb, tc, bc, rot, sj, sq);
            tc.fetch(t0 + BN, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
            fence_proxy_async();  // the staged stores, visible to the consumers' wgmma reads
            mbar_arrive(&full[st]);
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
    const int cw = warp - NW;  // consumer warp: rows cw * 16 .. + 15 (warpgroup 2: rows 0 .. 63)
    QueryRows qr;
    qr.load(b, q, stride_qt, stride_qh, h, cw, gid, tig);
    float o[DT][4];
    zero_acc(o);
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};  // m_run in scaled (log2) units
    float s[BN / 8][4];
    zero_acc(s);

#if WS_OVERLAP
    // Tile i + 1's scores and tile i's P V in flight together (FlashAttention-3's intra-warpgroup
    // pipelining): S(i + 1) is issued before P V(i), its softmax runs while P V(i) is still on the tensor
    // cores, and o's rescale (rare: the lazy max) waits until P V(i) is done. Two tiles of P in registers.
    // The last tile's P V is peeled off the loop: with S(i + 1) issued conditionally inside it, ptxas
    // serialized every wgmma (C7514).
    u32 pa[BN / 8][2], pn[BN / 8][2];
    auto tile_base = [&](int i) { return smem_u32(tiles + (i & 1) * (2 * TILE_BYTES)); };
    if (b.kv_hi > 0) {
        mbar_wait(&full[0], 0);
        issue_scores(s, qr.qa, tile_base(0));
        wgmma_wait_all();
        hold_regs<BN / 2>(&s[0][0]);
        online_softmax(s, pa, m_run, l_run, o, qr.pos, 0, b.diag0, win, tig, qk_scale);  // o is still zero
    }
    int i = 0;
    for (int t0 = 0; t0 + BN < b.kv_hi; ++i, t0 += BN) {
        mbar_wait(&full[(i + 1) & 1], ((i + 1) >> 1) & 1);
        issue_scores(s, qr.qa, tile_base(i + 1));
        issue_pv(o, pa, tile_base(i) + TILE_BYTES);
        wgmma_wait_one();  // S(i + 1) done; P V(i) may still run
        hold_regs<BN / 2>(&s[0][0]);
        float alpha[2];
        online_softmax(s, pn, m_run, l_run, o, qr.pos, t0 + BN, b.diag0, win, tig, qk_scale, alpha);
        wgmma_wait_all();
        hold_regs<HEAD_DIM / 2>(&o[0][0]);
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) asm volatile("" : "+r"(pa[n][0]), "+r"(pa[n][1])::"memory");
        // (pa read until here: its registers stay pa's, not pn's, while P V(i) reads them)
        mbar_arrive(&empty[i & 1]);  // tile i read: the producer may restage its buffer
        if (alpha[0] != 1.f || alpha[1] != 1.f) {
#pragma unroll
            for (int n = 0; n < DT; ++n) {
                o[n][0] *= alpha[0]; o[n][1] *= alpha[0]; o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
            }
        }
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) { pa[n][0] = pn[n][0]; pa[n][1] = pn[n][1]; }
    }
    if (b.kv_hi > 0) {  // the last tile's P V
        issue_pv(o, pa, tile_base(i) + TILE_BYTES);
        wgmma_wait_all();
        hold_regs<HEAD_DIM / 2>(&o[0][0]);
        mbar_arrive(&empty[i & 1]);
    }
#else
    for (int i = 0, t0 = 0; t0 < b.kv_hi; ++i, t0 += BN) {
        const int st = i & 1;
        mbar_wait(&full[st], (i >> 1) & 1);
        const u32 ks_base = smem_u32(tiles + st * (2 * TILE_BYTES)), vs_base = ks_base + TILE_BYTES;
        issue_scores(s, qr.qa, ks_base);
        wgmma_wait_all();
        hold_regs<BN / 2>(&s[0][0]);

        u32 pa[BN / 8][2];
        online_softmax(s, pa, m_run, l_run, o, qr.pos, t0, b.diag0, win, tig, qk_scale);
        issue_pv(o, pa, vs_base);
        wgmma_wait_all();
        hold_regs<HEAD_DIM / 2>(&o[0][0]);
        mbar_arrive(&empty[st]);  // this buffer's tile read: the producer may restage it
    }
#endif
    write_rows(b, qr, o, m_run, l_run, out, ml, stride_ot, stride_oh, hq, tig);
}
