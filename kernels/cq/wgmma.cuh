// Hopper wgmma pieces of the CQ prefill kernels (prefill_wgmma.cu, prefill_ws.cu; sm_90a): the tile layout
// their descriptors read (`tile_off`, 128-byte swizzle), shared-memory matrix descriptors, the wgmma fences
// and waits, the async-proxy fence for staged stores, and the m64n64k16 / m64n128k16 products with A from
// registers and B from shared memory. Include after prefill_common.cuh.
#pragma once

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
// all but the most recent committed group done (groups complete in order)
__device__ __forceinline__ void wgmma_wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }
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

// an accumulator array (O, or S before its first k-step) set to zero
template <int N>
__device__ __forceinline__ void zero_acc(float (&x)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) x[n][0] = x[n][1] = x[n][2] = x[n][3] = 0.f;
}

// S = Q K^T for this warpgroup's 64 rows and a tile's 64 keys, k16 steps along the head dim; committed,
// not waited for
__device__ __forceinline__ void issue_scores(float (&s)[BN / 8][4], const u32 (&qa)[KT][4], u32 ks_base) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        const u32 addr = ks_base + (kk >> 2) * (BN * 128) + (kk & 3) * 32;
        wgmma_n64<0>(&s[0][0], qa[kk], smem_desc(addr, 16, 1024), kk > 0);
    }
    wgmma_commit();
}

// O += P V: k16 steps of 16 keys, the value tile transposed (MN-major); committed, not waited for
__device__ __forceinline__ void issue_pv(float (&o)[DT][4], const u32 (&pa)[BN / 8][2], u32 vs_base) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        const u32 a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
        wgmma_pv<1>(&o[0][0], a, smem_desc(vs_base + kk * 2048, BN * 128, 1024), 1);
    }
    wgmma_commit();
}
