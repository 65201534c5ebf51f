// Prefill / chunked-prefill attention over CQ codes with Hopper's wgmma (sm_90a) and the codebooks resident
// in shared memory (issue 5). Verified on an H200 (2026-12-03, tests/kernels/test_cq_prefill_cuda.py) and
// what the dispatch runs on sm_90.
//
// Same CTA, staging and softmax as prefill_cuda.cu (prefill_common.cuh), different products: the CTA's
// two warpgroups each own 64 rows, and S = Q K^T and O += P V run as wgmma with Q and P from registers
// and the key / value tile read by descriptor from shared memory. mma.sync had every warp read the whole
// tile with ldmatrix (256 KB of shared-memory reads per tile per CTA, the measured limit of
// prefill_cuda.cu); a warpgroup reads it once per 64 rows (64 KB per tile), at the full tensor rate.
//
// Tile layout (wgmma's 128-byte swizzle): [64-dim half][key j][8 chunks of 16 bytes], chunk c stored at
// c ^ (j & 7), tiles 1024-byte aligned. Keys are B of S in K-major form (one k16 step = 32 bytes along a
// row; 8-key groups 1024 bytes apart); values are B of P V in MN-major form (transposed: 64-dim halves
// BN * 128 bytes apart, 8-key groups 1024 bytes apart).
//
// Pipeline per tile i (two buffers): issue S_i (async); stage tile i + 1 into the other buffer while it
// runs (codes loaded a tile earlier); wait S_i; mask and softmax; issue and wait P V_i; fence the staged
// stores to the async proxy; one barrier.

#include "prefill_common.cuh"
#include "wgmma.cuh"

extern "C" __global__ void __launch_bounds__(NT, 1) cq_prefill_wgmma_kernel(CQ_PREFILL_PARAMS) {
    layout_constants(stride_co, block_size);
    extern __shared__ __align__(1024) u8 smem[];
    u16* kcb = reinterpret_cast<u16*>(smem);
    u16* vcb = kcb + GK * 256 * CK;
    u8* tiles = smem + 2 * CB_BYTES;  // [2 buffers][keys, values][TILE_BYTES], 1024-byte aligned
#if HAS_ROPE
    float4* rot = reinterpret_cast<float4*>(tiles + 4 * TILE_BYTES);  // [PPT / 2][NT]
    float* base = reinterpret_cast<float*>(rot + (PPT / 2) * NT);     // [2][HEAD_DIM]: tile start's cos | sin
#else
    const float4* rot = nullptr;
    float* base = nullptr;
#endif
    if (smem_u32(tiles) & 1023) __trap();  // the swizzle is on address bits: tiles must start on 1024 bytes

    const int h = blockIdx.y, hq = gridDim.y * G;
    QueryBlock b;
    if (!query_block(qsl, seq_lens, num_seqs, win, b)) return;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int sj = threadIdx.x >> 2, sq = threadIdx.x & 3;  // staging: key sj of the tile, part sq

    TileCodes tc;
    tc.bt = block_table + (i64)b.i_s * stride_bt;
    tc.head_base = cache + (i64)h * stride_ch;
    tc.fetch(0, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
#if HAS_ROPE
    // tile starts' cos/sin rows: tiles 0 and 1 now (tile i + 1's row is staged during tile i), tile 2's in
    // registers; each later row is stored a tile before its staging and loaded a tile before that
    float4 base_next = make_float4(0.f, 0.f, 0.f, 0.f);
    if (threadIdx.x < HEAD_DIM / 4) {
        const int c = 4 * threadIdx.x;
        reinterpret_cast<float4*>(base)[threadIdx.x] = *reinterpret_cast<const float4*>(cos_sin + c);
        if (BN < b.kv_hi) {
            reinterpret_cast<float4*>(base + HEAD_DIM)[threadIdx.x] =
                *reinterpret_cast<const float4*>(cos_sin + BN * stride_cs + c);
        }
        if (2 * BN < b.kv_hi) base_next = *reinterpret_cast<const float4*>(cos_sin + 2 * BN * stride_cs + c);
    }
#endif
    stage_codebooks(smem, kcb_g, vcb_g, h);
#if HAS_ROPE
    stage_rotations(rot, cos_sin, stride_cs, sj, sq);
#endif
    QueryRows qr;
    qr.load(b, q, stride_qt, stride_qh, h, warp, gid, tig);

    float o[DT][4];
    zero_acc(o);
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};  // m_run in scaled (log2) units
    float s[BN / 8][4];  // this tile's raw scores (the first k-step of each S overwrites them)
    zero_acc(s);
    __syncthreads();  // codebooks, rotations, cos/sin rows staged
    stage_key(tiles, tiles + TILE_BYTES, kcb, vcb, tc, base + sq * PPT, rot, sj, sq);  // tile 0 into buffer 0
    tc.fetch(BN, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
    fence_proxy_async();
    __syncthreads();

    for (int t0 = 0, buf = 0; t0 < b.kv_hi; t0 += BN, buf ^= 1) {
        const u32 ks_base = smem_u32(tiles + buf * (2 * TILE_BYTES)), vs_base = ks_base + TILE_BYTES;
        // S = Q K^T: this warpgroup's 64 rows x the tile's 64 keys, k16 steps along the head dim
        issue_scores(s, qr.qa, ks_base);
        if (t0 + BN < b.kv_hi) {  // while S runs: stage tile i + 1 into the other buffer
            u8* nk = tiles + (buf ^ 1) * (2 * TILE_BYTES);
            stage_key(nk, nk + TILE_BYTES, kcb, vcb, tc, base + (buf ^ 1) * HEAD_DIM + sq * PPT, rot, sj, sq);
        }
#if HAS_ROPE
        if (threadIdx.x < HEAD_DIM / 4) {  // tile i + 2's row into this tile's buffer (read after the barrier)
            reinterpret_cast<float4*>(base + buf * HEAD_DIM)[threadIdx.x] = base_next;
            if (t0 + 3 * BN < b.kv_hi) {
                base_next = *reinterpret_cast<const float4*>(cos_sin + (i64)(t0 + 3 * BN) * stride_cs + 4 * threadIdx.x);
            }
        }
#endif
        tc.fetch(t0 + 2 * BN, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
        wgmma_wait_all();
        hold_regs<BN / 2>(&s[0][0]);

        u32 pa[BN / 8][2];  // P packed: [n-tile][row gid / gid + 8]
        online_softmax(s, pa, m_run, l_run, o, qr.pos, t0, b.diag0, win, tig, qk_scale);
        // O += P V: k16 steps of 16 keys, the value tile transposed (MN-major)
        issue_pv(o, pa, vs_base);
        wgmma_wait_all();
        hold_regs<HEAD_DIM / 2>(&o[0][0]);
        fence_proxy_async();
        __syncthreads();  // tile i + 1 staged; this tile's buffer read by both warpgroups
    }
    write_rows(b, qr, o, m_run, l_run, out, ml, stride_ot, stride_oh, hq, tig);
}
