// Bilinear grid sampling, as PyTorch's grid_sample(mode="bilinear",
// padding_mode="zeros", align_corners=False) and sere-core `bilinear`:
// a point (gx, gy) in [-1, 1] maps to pixel coordinates
// ix = ((gx + 1) W - 1) / 2, iy likewise; the up-to-four in-bounds
// neighbours are blended, out-of-bounds neighbours contribute zero.
// Layouts: `hwc == 0`: map C x H x W, output C x P;
//          `hwc != 0`: map H x W x C, output P x C.

// The four neighbours in the order (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
// (x0 + 1, y0 + 1); bit i of `mask` says whether neighbour i is inside the
// map. Fixed-size, constant-indexed arrays stay in registers.
struct Corners {
    unsigned mask;
    int pix[4];
    float w[4];
    float dwx[4];
    float dwy[4];
};

__device__ __forceinline__ Corners corners(float gx, float gy, int H, int W) {
    Corners k;
    k.mask = 0u;
    // Round every step like the CPU (no fused multiply-add), so both sides
    // pick the same neighbours at pixel edges.
    const float ix = __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(gx, 1.0f), (float)W), 1.0f), 0.5f);
    const float iy = __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(gy, 1.0f), (float)H), 1.0f), 0.5f);
    // Every neighbour outside (also skips far-away points and NaN).
    if (!(ix >= -1.0f && ix < (float)W && iy >= -1.0f && iy < (float)H)) return k;
    const float x0f = floorf(ix), y0f = floorf(iy);
    const float tx = ix - x0f, ty = iy - y0f;
    const int x0 = (int)x0f, y0 = (int)y0f;
    const bool inx0 = x0 >= 0, inx1 = x0 + 1 < W, iny0 = y0 >= 0, iny1 = y0 + 1 < H;
    k.mask = (inx0 && iny0 ? 1u : 0u) | (inx1 && iny0 ? 2u : 0u) | (inx0 && iny1 ? 4u : 0u) |
             (inx1 && iny1 ? 8u : 0u);
    k.pix[0] = y0 * W + x0;
    k.pix[1] = k.pix[0] + 1;
    k.pix[2] = k.pix[0] + W;
    k.pix[3] = k.pix[2] + 1;
    k.w[0] = (1.0f - tx) * (1.0f - ty);
    k.w[1] = tx * (1.0f - ty);
    k.w[2] = (1.0f - tx) * ty;
    k.w[3] = tx * ty;
    k.dwx[0] = -(1.0f - ty);
    k.dwx[1] = 1.0f - ty;
    k.dwx[2] = -ty;
    k.dwx[3] = ty;
    k.dwy[0] = -(1.0f - tx);
    k.dwy[1] = -tx;
    k.dwy[2] = 1.0f - tx;
    k.dwy[3] = tx;
    return k;
}

// Forward: one thread per output element (coalesced writes in both layouts).
// Launch: 1-D grid-stride over C * P.
extern "C" __global__ void grid_sample_fwd(const float* map, const float* grid, float* out, int C,
                                           int H, int W, int P, int hwc) {
    const long long n = (long long)C * P;
    const long long mcs = hwc ? 1 : (long long)H * W;
    const long long mps = hwc ? C : 1;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const int p = hwc ? (int)(idx / C) : (int)(idx % P);
        const int c = hwc ? (int)(idx % C) : (int)(idx / P);
        const Corners k = corners(grid[2 * p], grid[2 * p + 1], H, W);
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (k.mask & (1u << i)) acc += k.w[i] * map[c * mcs + k.pix[i] * mps];
        out[idx] = acc;
    }
}

// Backward: one warp per point, lanes over channels. Adds the map gradient
// (atomicAdd: points may share pixels, as PyTorch's scatter-add) and, when
// `grad_grid` is not null, the point's grid gradient (warp-reduced over the
// channels, written by lane 0 without atomics).
// Launch: 1-D, blockDim a multiple of 32, ceil(P * 32 / blockDim) blocks.
extern "C" __global__ void grid_sample_bwd(const float* map, const float* grid,
                                           const float* grad_out, float* grad_map,
                                           float* grad_grid, int C, int H, int W, int P,
                                           int hwc) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= P) return;  // the whole warp leaves together
    const int p = (int)warp;
    const long long mcs = hwc ? 1 : (long long)H * W;
    const long long mps = hwc ? C : 1;
    const Corners k = corners(grid[2 * p], grid[2 * p + 1], H, W);
    float dix = 0.0f, diy = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float go = grad_out[hwc ? (long long)p * C + c : (long long)c * P + p];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (!(k.mask & (1u << i))) continue;
            const long long m = c * mcs + k.pix[i] * mps;
            atomicAdd(&grad_map[m], k.w[i] * go);
            if (grad_grid) {
                const float mv = map[m];
                dix += k.dwx[i] * mv * go;
                diy += k.dwy[i] * mv * go;
            }
        }
    }
    if (grad_grid) {
        dix = warp_sum(dix);
        diy = warp_sum(diy);
        if (lane == 0) {
            grad_grid[2 * p] += dix * ((float)W * 0.5f);
            grad_grid[2 * p + 1] += diy * ((float)H * 0.5f);
        }
    }
}

// Batched forward over a set of HWC maps for the training step: slot `s`
// (blockIdx.y) samples map `index[s]` (of `nmaps`, each `map_stride`
// floats apart) at its own P points (`grids + s * 2P`) into
// `out + s * P * C`. An index outside [0, nmaps) gives zeros (never read
// out of bounds). Launch: grid (x: grid-stride over P * C, y: slots).
extern "C" __global__ void grid_sample_fwd_idx(const float* maps, long long map_stride, int nmaps,
                                               const int* index, const float* grids, float* out,
                                               int C, int H, int W, int P) {
    const int s = blockIdx.y;
    const int img = index[s];
    const long long n = (long long)C * P;
    const float* grid = grids + (long long)s * 2 * P;
    float* o = out + (long long)s * n;
    const bool ok = img >= 0 && img < nmaps;
    const float* map = maps + (ok ? (long long)img * map_stride : 0);
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const int p = (int)(idx / C);
        const int c = (int)(idx % C);
        float acc = 0.0f;
        if (ok) {
            const Corners k = corners(grid[2 * p], grid[2 * p + 1], H, W);
#pragma unroll
            for (int i = 0; i < 4; ++i)
                if (k.mask & (1u << i)) acc += k.w[i] * map[(long long)k.pix[i] * C + c];
        }
        o[idx] = acc;
    }
}

// Batched map gradient of grid_sample_fwd_idx: one warp per (slot, point),
// lanes over channels, atomicAdd into `grad_maps + index[s] * map_stride`
// (points, and slots naming the same map, may share pixels). No grid
// gradient (the training step does not need one).
// Launch: 1-D, blockDim a multiple of 32, ceil(slots * P * 32 / blockDim) blocks.
extern "C" __global__ void grid_sample_bwd_idx(const int* index, const float* grids,
                                               const float* grad_out, float* grad_maps,
                                               long long map_stride, int nmaps, int slots, int C,
                                               int H, int W, int P) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= (long long)slots * P) return;  // the whole warp leaves together
    const int s = (int)(warp / P);
    const int p = (int)(warp % P);
    const int img = index[s];
    if (img < 0 || img >= nmaps) return;
    const float* grid = grids + (long long)s * 2 * P;
    const float* go = grad_out + ((long long)s * P + p) * C;
    float* gm = grad_maps + (long long)img * map_stride;
    const Corners k = corners(grid[2 * p], grid[2 * p + 1], H, W);
    for (int c = lane; c < C; c += 32) {
        const float g = go[c];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (k.mask & (1u << i)) atomicAdd(&gm[(long long)k.pix[i] * C + c], k.w[i] * g);
    }
}
