// Shared helpers for every sere-cuda kernel file. The Rust side prepends this
// file to each .cu source before handing it to NVRTC (no include paths, no
// system headers: NVRTC provides the math builtins).
//
// Row kernels use a 2-D block: blockDim.x threads cooperate on one row
// (a power of two between 32 and 1024), blockDim.y rows share a block
// (blockDim.x * blockDim.y <= 1024, so at most 32 warps per block).
// A row's threads reduce with warp shuffles and, when the row spans several
// warps, through 32 floats of shared memory.

#define SERE_NEG_INF (__int_as_float(0xff800000))
#define SERE_FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SERE_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(SERE_FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SERE_FULL_MASK, v, o);
    return v;
}

// Merges two online-softmax states (max m, sum s of exp(x - m)).
__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == SERE_NEG_INF) return;  // both empty
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// Adds one value to an online-softmax state.
__device__ __forceinline__ void ms_push(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}

__device__ __forceinline__ void warp_ms(float& m, float& s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(SERE_FULL_MASK, m, o);
        float s2 = __shfl_xor_sync(SERE_FULL_MASK, s, o);
        ms_merge(m, s, m2, s2);
    }
}

// Sum over the blockDim.x threads of this row. Every thread of the block
// must call it (it may contain __syncthreads); all threads of the row get
// the result. `sh` holds at least 32 floats.
__device__ __forceinline__ float row_sum(float v, float* sh) {
    v = warp_sum(v);
    if (blockDim.x == 32) return v;
    const int wpr = blockDim.x >> 5;
    const int base = threadIdx.y * wpr;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[base + (threadIdx.x >> 5)] = v;
    __syncthreads();
    float r = 0.0f;
    for (int i = 0; i < wpr; ++i) r += sh[base + i];
    return r;
}

// Online-softmax state (m, s) over the blockDim.x threads of this row.
// `sh_m`, `sh_s` hold at least 32 floats each.
__device__ __forceinline__ void row_ms(float& m, float& s, float* sh_m, float* sh_s) {
    warp_ms(m, s);
    if (blockDim.x == 32) return;
    const int wpr = blockDim.x >> 5;
    const int base = threadIdx.y * wpr;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        sh_m[base + (threadIdx.x >> 5)] = m;
        sh_s[base + (threadIdx.x >> 5)] = s;
    }
    __syncthreads();
    float rm = SERE_NEG_INF, rs = 0.0f;
    for (int i = 0; i < wpr; ++i) ms_merge(rm, rs, sh_m[base + i], sh_s[base + i]);
    m = rm;
    s = rs;
}

// Sum over a whole 1-D block (blockDim.x a multiple of 32, at most 1024);
// the result is valid in every thread.
__device__ __forceinline__ double block_sum_d(double v, double* sh) {
    v = warp_sum_d(v);
    const int nw = blockDim.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    double r = 0.0;
    for (int i = 0; i < nw; ++i) r += sh[i];
    return r;
}
