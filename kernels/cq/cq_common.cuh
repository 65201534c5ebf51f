// Device helpers shared by the CQ CUDA kernels (decode_cuda.cu, prefill_cuda.cu): 16-bit model
// values (IS_BF16: bfloat16, else float16) packed two per register, tensor-core MMA, centroid and
// code-byte loads. No CUDA headers: everything is inline PTX or NVRTC builtins.
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

// The page layout as compile-time constants where an instance gives them (-DSLOT_BYTES, -DPAGE_SIZE,
// -DPAGE_SHIFT: cuda_build.layout_defines, from the launch's own cache tensor), assigned over the kernel's
// token-stride and page-size arguments on entry: the code loads' offsets become immediates and the page
// arithmetic shifts.
__device__ __forceinline__ void layout_constants(i64& stride_co, int& block_size) {
#ifdef SLOT_BYTES
    stride_co = SLOT_BYTES;
#endif
#ifdef PAGE_SIZE
    block_size = PAGE_SIZE;
#endif
}
