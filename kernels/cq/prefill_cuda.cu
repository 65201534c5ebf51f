// Prefill / chunked-prefill attention over CQ codes with the codebooks resident in shared memory
// (issue 5). Verified against the torch reference on an H200 (tests/kernels/test_cq_prefill_cuda.py).
// Its macros, CTA set-up, staging, softmax and epilogue are prefill_common.cuh's (shared with the wgmma
// and warp-specialized Hopper forms); the products here are mma.sync m16n8k16 with ldmatrix operands.
// (This body used to inline them; on the shared functions it passed the prefill tests on the H200,
// 2026-12-03, in a build whose shared functions also read a bank-aware codebook layout, since withdrawn
// as slower: the functions it calls now are the ones the verified wgmma form runs.)
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
    layout_constants(stride_co, block_size);
    extern __shared__ __align__(16) u8 smem[];
    u16* kcb = reinterpret_cast<u16*>(smem);
    u16* vcb = kcb + GK * 256 * CK;
    u8* tiles = smem + 2 * CB_BYTES;  // [2 buffers][keys, values][BN][HEAD_DIM]
#if HAS_ROPE
    float4* rot = reinterpret_cast<float4*>(tiles + 4 * TILE_BYTES);  // [PPT / 2][NT]
    float* base = reinterpret_cast<float*>(rot + (PPT / 2) * NT);     // [2][HEAD_DIM]: tile start's cos | sin
#else
    const float4* rot = nullptr;
    float* base = nullptr;
#endif

    const int h = blockIdx.y, hq = gridDim.y * G;
    QueryBlock b;
    if (!query_block(qsl, seq_lens, num_seqs, win, b)) return;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int sj = threadIdx.x >> 2, sq = threadIdx.x & 3;  // staging: key sj of the tile, part sq

    TileCodes tc;  // the next tile's code bytes for key t0 + sj, in registers a tile ahead
    tc.bt = block_table + (i64)b.i_s * stride_bt;
    tc.head_base = cache + (i64)h * stride_ch;
    tc.fetch(0, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
#if HAS_ROPE
    BaseRows rows;  // tile starts' cos/sin rows: tile 0's now, tile 1's in registers
    rows.start(base, cos_sin, stride_cs, b.kv_hi);
#endif
    stage_codebooks(smem, kcb_g, vcb_g, h);
#if HAS_ROPE
    stage_rotations(rot, cos_sin, stride_cs, sj, sq);
#endif
    QueryRows qr;
    qr.load(b, q, stride_qt, stride_qh, h, warp, gid, tig);
    const u32(&qa)[KT][4] = qr.qa;

    float o[DT][4];
#pragma unroll
    for (int n = 0; n < DT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};  // m_run in scaled (log2) units
    __syncthreads();  // codebooks, rotations and tile 0's cos/sin row staged

    for (int t0 = 0, buf = 0; t0 < b.kv_hi; t0 += BN, buf ^= 1) {
        u8* ks = tiles + buf * (2 * TILE_BYTES);
        u8* vs = ks + TILE_BYTES;
        stage_key(ks, vs, kcb, vcb, tc, base + buf * HEAD_DIM + sq * PPT, rot, sj, sq);
#if HAS_ROPE
        rows.advance(base, buf, t0, cos_sin, stride_cs, b.kv_hi);  // the next tile's row, read after the barrier
#endif
        tc.fetch(t0 + BN, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
        __syncthreads();  // tile staged; the other buffer's tile (two steps back) consumed by every warp

        const u32 ks_base = smem_u32(ks), vs_base = smem_u32(vs);
        // S = Q K^T for this warp's 16 rows and the tile's 64 keys (raw scores)
        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kp = 0; kp < KT / 2; ++kp) {  // two k-steps per ldmatrix.x4: chunks 4kp .. 4kp + 3
                u32 fr[4];
                ldsm_x4(ks_base + tile_off(8 * nt + (lane & 7), 4 * kp + (lane >> 3)), fr);
                mma16816(s[nt], qa[2 * kp][0], qa[2 * kp][1], qa[2 * kp][2], qa[2 * kp][3], fr[0], fr[1]);
                mma16816(s[nt], qa[2 * kp + 1][0], qa[2 * kp + 1][1], qa[2 * kp + 1][2], qa[2 * kp + 1][3], fr[2], fr[3]);
            }
        }
        u32 pa[BN / 8][2];  // P packed: [n-tile][row gid / gid + 8]
        online_softmax(s, pa, m_run, l_run, o, qr.pos, t0, b.diag0, win, tig, qk_scale);
        // O += P V: k-steps of 16 keys, V fragments by ldmatrix.trans (two 8-dim n-tiles per load)
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int nd = 0; nd < DT; nd += 2) {
                u32 fr[4];
                const int key = 16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7);
                ldsm_x4_t(vs_base + tile_off(key, nd + (lane >> 4)), fr);
                mma16816(o[nd], pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1], fr[0], fr[1]);
                mma16816(o[nd + 1], pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1], fr[2], fr[3]);
            }
        }
    }

    write_rows(b, qr, o, m_run, l_run, out, ml, stride_ot, stride_oh, hq, tig);
}
