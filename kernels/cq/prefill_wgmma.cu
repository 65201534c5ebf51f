// Prefill / chunked-prefill attention over CQ codes with Hopper's wgmma (sm_90a) and the codebooks resident
// in shared memory (issue 5). WRITTEN 2026-12-03 WITHOUT A GPU: compiled for sm_90a in CI; the dispatch
// takes it only when asked (VLLM_CQ_PREFILL_KERNEL=wgmma) until tests/kernels/test_cq_prefill_cuda.py has
// passed with it on an H100/H200.
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

__device__ __forceinline__ int tile_off(int j, int c) {
    return (c >> 3) * (BN * 128) + j * 128 + (((c & 7) ^ (j & 7)) << 4);
}

// wgmma shared-memory matrix descriptor: start address, leading / stride byte offsets, 128-byte swizzle
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// generic-proxy stores (the staging) made visible to wgmma's async-proxy reads, before the barrier
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// the accumulators are written by the wgmma in flight: no reads of them before the wait (an empty asm that
// "writes" each register, ordered after the wait)
template <int N>
__device__ __forceinline__ void hold_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D[64 x 64] (+)= A (registers, 16-bit) x B (shared memory, descriptor), float32 accumulators
template <int TRANS_B>
__device__ __forceinline__ void wgmma_n64(float* d, const u32* a, u64 desc, int accumulate) {
    asm volatile(
        "{ .reg .pred p; setp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." HALF2_TYPE "." HALF2_TYPE " "
        "{" 
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
}

// D[64 x 128] (+)= A (registers, 16-bit) x B (shared memory, descriptor), float32 accumulators
template <int TRANS_B>
__device__ __forceinline__ void wgmma_n128(float* d, const u32* a, u64 desc, int accumulate) {
    asm volatile(
        "{ .reg .pred p; setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." HALF2_TYPE "." HALF2_TYPE " "
        "{" 
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
}


#if HEAD_DIM == 128
#define wgmma_pv wgmma_n128
#else
#define wgmma_pv wgmma_n64
#endif

extern "C" __global__ void __launch_bounds__(NT, 1) cq_prefill_wgmma_kernel(CQ_PREFILL_PARAMS) {
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
#pragma unroll
    for (int n = 0; n < DT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};  // m_run in scaled (log2) units
    float s[BN / 8][4];  // this tile's raw scores (the first k-step of each S overwrites them)
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    __syncthreads();  // codebooks, rotations, cos/sin rows staged
    stage_key(tiles, tiles + TILE_BYTES, kcb, vcb, tc, base + sq * PPT, rot, sj, sq);  // tile 0 into buffer 0
    tc.fetch(BN, b.kv_hi, sj, sq, stride_cb, stride_co, block_size, v_offset);
    fence_proxy_async();
    __syncthreads();

    for (int t0 = 0, buf = 0; t0 < b.kv_hi; t0 += BN, buf ^= 1) {
        const u32 ks_base = smem_u32(tiles + buf * (2 * TILE_BYTES)), vs_base = ks_base + TILE_BYTES;
        // S = Q K^T: this warpgroup's 64 rows x the tile's 64 keys, k16 steps along the head dim
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
            const u32 addr = ks_base + (kk >> 2) * (BN * 128) + (kk & 3) * 32;
            wgmma_n64<0>(&s[0][0], qr.qa[kk], smem_desc(addr, 16, 1024), kk > 0);
        }
        wgmma_commit();
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
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const u32 a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
            wgmma_pv<1>(&o[0][0], a, smem_desc(vs_base + kk * 2048, BN * 128, 1024), 1);
        }
        wgmma_commit();
        wgmma_wait_all();
        hold_regs<HEAD_DIM / 2>(&o[0][0]);
        fence_proxy_async();
        __syncthreads();  // tile i + 1 staged; this tile's buffer read by both warpgroups
    }
    write_rows(b, qr, o, m_run, l_run, out, ml, stride_ot, stride_oh, hq, tig);
}
