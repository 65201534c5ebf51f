// Device helpers shared by the CQ CUDA kernels (decode_cuda.cu, prefill_*.cu): 16-bit model values
// (IS_BF16: bfloat16, else float16) packed two per register, tensor-core MMA, centroid and code-byte
// loads, the codebooks' shared-memory layouts. No CUDA headers: everything is inline PTX or NVRTC builtins.
#pragma once

#define NEG_INF (-__int_as_float(0x7f800000))

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ float lo_f(u32 w) {
#if IS_BF16
    return __uint_as_float(w << 16);
#else
    float f;
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l; }" : "=f"(f) : "r"(w));
    return f;
#endif
}

__device__ __forceinline__ float hi_f(u32 w) {
#if IS_BF16
    return __uint_as_float(w & 0xffff0000u);
#else
    float f;
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(w));
    return f;
#endif
}

#if IS_BF16
#define HALF2_TYPE "bf16"
#else
#define HALF2_TYPE "f16"
#endif

// (lo, hi) -> one register of two 16-bit values, lo in the low half (the MMA's lower index)
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn." HALF2_TYPE "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." HALF2_TYPE "." HALF2_TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// a * b + c on two packed 16-bit values (one rounding), the model's format
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn." HALF2_TYPE "x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// N 16-bit values (N even) from an address aligned to 2N bytes, as N/2 words
template <int N>
__device__ __forceinline__ void lds_words(const u16* src, u32* dst) {
    if constexpr (N % 8 == 0) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
            uint4 v = reinterpret_cast<const uint4*>(src)[i];
            dst[4 * i] = v.x; dst[4 * i + 1] = v.y; dst[4 * i + 2] = v.z; dst[4 * i + 3] = v.w;
        }
    } else if constexpr (N == 4) {
        uint2 v = *reinterpret_cast<const uint2*>(src);
        dst[0] = v.x; dst[1] = v.y;
    } else {
        static_assert(N == 2, "centroid slices of 2, 4 or a multiple of 8 channels");
        dst[0] = *reinterpret_cast<const u32*>(src);
    }
}

template <int N> struct CodeWord { typedef u32 T; };  // N code bytes held in the narrowest register
template <> struct CodeWord<8> { typedef u64 T; };

template <typename W>
__device__ __forceinline__ u32 code_at(W bytes, int j) { return (u32)(bytes >> (8 * j)) & 0xffu; }

template <int N>
__device__ __forceinline__ typename CodeWord<N>::T ldg_bytes(const u8* p) {
    if constexpr (N == 8) {
        return __ldg(reinterpret_cast<const unsigned long long*>(p));
    } else if constexpr (N == 4) {
        return __ldg(reinterpret_cast<const unsigned int*>(p));
    } else if constexpr (N == 2) {
        return (u32)__ldg(reinterpret_cast<const unsigned short*>(p));
    } else {
        static_assert(N == 1, "1, 2, 4 or 8 code bytes per load");
        return (u32)__ldg(p);
    }
}

// The codebooks in shared memory, laid out for the kernels' gathers. A centroid of C channels is read in
// units of U = min(C, 8) channels, one shared load of 2U <= 16 bytes (a 16-channel centroid: two units, one
// code). Shared memory serves a load in phases of S = 64 / U lanes, one 128-byte wavefront each when their
// addresses fall in distinct 2U-byte slots of a row. Codebooks stored group after group put a lane's
// centroid at slot code % S: random, about 2.6 wavefronts per phase at U = 8 where 1 is the floor
// (shared-memory stalls were the wgmma prefill's first stall reason on the H200, ncu 2026-12-03).
// CbLayout: the lanes of a phase are S / 4 keys x 4 parts (the prefill staging's sq, threadIdx = 4 sj + sq;
// the decode's key gathers: tig, keys gid). Part sq's units live in slots [sq * S / 4, (sq + 1) * S / 4)
// only, and
//  - XOR (prefill, U = 8: cq1 keys and values, 16-channel values): the thread of key sj reads its units in
//    the order x ^ (sj & 1), and unit x sits in slot 2 sq + (x & 1): a phase's 8 lanes hit 8 distinct
//    slots, one wavefront;
//  - otherwise slot sq * S / 4 + code % (S / 4): the phase's keys spread by their codes, never across parts
//    (about 1.9 wavefronts at U = 8).
// NU: units of one part (per half for keys). The same bytes as the plain layout.
template <int U, int NU, bool ALLOW_XOR = true>
struct CbLayout {
    static constexpr int S = 64 / U;                             // unit slots per 128-byte row
    static constexpr bool XOR = ALLOW_XOR && U == 8 && NU >= 2;  // unit order x ^ (sj & 1)
    static constexpr int M = XOR ? 2 : 1;                        // slot bits from the unit index
    static constexpr int Q = S / 4 / M;                          // slot bits from the code
    static_assert(NU % M == 0 && 256 % Q == 0, "unit counts");

    // element (16-bit) offset of unit x of part sq, half h (keys; 0 for values), for code c
    __device__ static __forceinline__ int off(int h, int sq, int x, int c) {
        const int row = (h * (NU / M) + x / M) * (256 / Q) + c / Q;
        return (row * S + sq * (S / 4) + x % M + M * (c % Q)) * U;
    }
    // the unit order of key sj's thread: its register slot i holds unit i ^ xr(sj)
    __device__ static __forceinline__ int xr(int sj) { return XOR ? (sj & 1) : 0; }
};

// The decode kernel's value gathers: lane (gid, tig) reads value dims [gid * VDT, (gid + 1) * VDT) of key
// tig's slot, so a phase of S = 64 / U lanes is 16 / U owners (gid) x 4 keys. Owner o's units live in the
// 4 slots [4 (o % (16 / U)), + 4) by code % 4: the phase's owners never collide, its 4 keys spread by code.
// u: the unit's index along the head (dims u * U ..), c: the code.
template <int U, int VDT>
struct OwnerLayout {
    static constexpr int S = 64 / U, CLS = 16 / U, UPO = VDT / U;  // slots per row, owners per phase, units per owner
    static_assert(VDT % U == 0 && 8 % CLS == 0, "owner units");
    __device__ static __forceinline__ int off(int u, int c) {
        const int o = u / UPO, row = ((o / CLS) * UPO + u % UPO) * 64 + c / 4;
        return (row * S + (o % CLS) * 4 + c % 4) * U;
    }
};

// One codebook [groups, 256, C] of 16-bit values (`bytes` in all) from global into shared memory, unit k
// (U = min(C, 8) channels) of centroid c of group g at element offset unit_off(g, k, c); threads [0, n),
// 16 bytes per load.
template <int C, class F>
__device__ __forceinline__ void stage_cb(u16* dst, const u16* src, int bytes, int n, F unit_off) {
    const uint4* s16 = reinterpret_cast<const uint4*>(src);
    for (int i = threadIdx.x; i < bytes / 16; i += n) {
        const uint4 v = __ldg(s16 + i);
        const int e0 = i * 8, g = e0 / (256 * C), c = (e0 / C) % 256;  // group, first code
        if constexpr (C >= 8) {  // one unit of one centroid
            *reinterpret_cast<uint4*>(dst + unit_off(g, (e0 % C) / 8, c)) = v;
        } else {  // 8 / C centroids, codes c, c + 1, ...
            const u32 wv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int t = 0; t < 8 / C; ++t) {
                u16* d = dst + unit_off(g, 0, c + t);
                if constexpr (C == 4) {
                    *reinterpret_cast<uint2*>(d) = make_uint2(wv[2 * t], wv[2 * t + 1]);
                } else if constexpr (C == 2) {
                    *reinterpret_cast<u32*>(d) = wv[t];
                } else {
                    d[0] = (u16)(wv[t / 2] >> (16 * (t & 1)));
                }
            }
        }
    }
}
