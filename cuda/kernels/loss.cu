// Cross-entropy between a sharpened teacher and a student distribution
// (sere-core `loss`): relation cross-entropy and the DINO loss, each fused
// with its softmaxes and its gradient. Per row:
//   q = softmax((t - c) / tau_t), p = softmax(s / tau_s),
//   loss = ln Z_s + sum_k q_k (m_s - s_k / tau_s),  grad += f (p - q).
// Pass 1 gathers the online (max, sum) of both rows, pass 2 writes the
// gradient and sums the non-negative cross terms (no cancellation). Row
// losses go to `row_loss`; `sum_finish` (reduce.cu) turns them into the mean.
// Launch: row layout of common.cuh.

// Relation cross-entropy over `rows` rows. `grad` may be null (loss only).
extern "C" __global__ void relation_ce_rows(const float* s, const float* t, float* grad,
                                            float* row_loss, int rows, int cols, float inv_ts,
                                            float inv_tt, float f) {
    __shared__ float sh_ms[32], sh_zs[32], sh_mt[32], sh_zt[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    float ms = SERE_NEG_INF, zs = 0.0f, mt = SERE_NEG_INF, zt = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            ms_push(ms, zs, s[base + j] * inv_ts);
            ms_push(mt, zt, t[base + j] * inv_tt);
        }
    row_ms(ms, zs, sh_ms, sh_zs);
    row_ms(mt, zt, sh_mt, sh_zt);
    const float inv_zs = 1.0f / zs, inv_zt = 1.0f / zt;
    float cross = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float sv = s[base + j] * inv_ts;
            const float q = expf(t[base + j] * inv_tt - mt) * inv_zt;
            if (q > 0.0f) cross += q * (ms - sv);
            if (grad) {
                const float p = expf(sv - ms) * inv_zs;
                grad[base + j] += f * (p - q);
            }
        }
    cross = row_sum(cross, sh_ms);
    if (active && threadIdx.x == 0) row_loss[row] = logf(zs) + cross;
}

// DINO, step 1: per teacher row (view, image) the max and 1 / sum of the
// centred, sharpened logits: stats[2 r] = m_t, stats[2 r + 1] = 1 / Z_t.
extern "C" __global__ void dino_teacher_stats(const float* t, const float* centre, float* stats,
                                              int rows, int dim, float inv_tt) {
    __shared__ float sh_m[32], sh_s[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * dim;
    float m = SERE_NEG_INF, z = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < dim; j += blockDim.x)
            ms_push(m, z, (t[base + j] - centre[j]) * inv_tt);
    row_ms(m, z, sh_m, sh_s);
    if (active && threadIdx.x == 0) {
        stats[2 * (long long)row] = m;
        stats[2 * (long long)row + 1] = 1.0f / z;
    }
}

// DINO, step 2: one row per student (view v, image b), summed over the
// teacher views iq != v. The gradient of the row is
// f * (n_pairs * p - sum_iq q_iq), written once, so no two rows race.
// `grad` may be null (loss only).
extern "C" __global__ void dino_student_rows(const float* s, const float* t, const float* centre,
                                             const float* stats, float* grad, float* row_loss,
                                             int student_views, int teacher_views, int batch,
                                             int dim, float inv_ts, float inv_tt, float f) {
    __shared__ float sh_m[32], sh_s[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const int rows = student_views * batch;
    const bool active = row < rows;
    const int v = active ? row / batch : 0;
    const int b = active ? row % batch : 0;
    const int npairs = teacher_views - (v < teacher_views ? 1 : 0);
    const long long base = (long long)row * dim;
    float ms = SERE_NEG_INF, zs = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < dim; j += blockDim.x) ms_push(ms, zs, s[base + j] * inv_ts);
    row_ms(ms, zs, sh_m, sh_s);
    const float inv_zs = 1.0f / zs;
    float cross = 0.0f;
    if (active && npairs > 0)
        for (int j = threadIdx.x; j < dim; j += blockDim.x) {
            const float sv = s[base + j] * inv_ts;
            const float c = centre[j];
            float qsum = 0.0f;
            for (int iq = 0; iq < teacher_views; ++iq) {
                if (iq == v) continue;
                const long long tr = (long long)iq * batch + b;
                const float q = expf((t[tr * dim + j] - c) * inv_tt - stats[2 * tr]) * stats[2 * tr + 1];
                qsum += q;
                if (q > 0.0f) cross += q * (ms - sv);
            }
            if (grad) {
                const float p = expf(sv - ms) * inv_zs;
                grad[base + j] += f * ((float)npairs * p - qsum);
            }
        }
    cross = row_sum(cross, sh_m);
    if (active && threadIdx.x == 0)
        row_loss[row] = npairs > 0 ? (float)npairs * logf(zs) + cross : 0.0f;
}

// iBOT's masked-patch loss (sere-core `weighted_cross_entropy`): per row r of
// weight w[r] > 0, the centred cross-entropy of DINO's row, times w[r];
// rows of weight 0 are skipped (their loss is 0 and they get no gradient).
// `grad` may be null (loss only); f = scale / tau_s.
extern "C" __global__ void weighted_ce_rows(const float* s, const float* t, const float* centre,
                                            const float* w, float* grad, float* row_loss,
                                            int rows, int cols, float inv_ts, float inv_tt,
                                            float f) {
    __shared__ float sh_ms[32], sh_zs[32], sh_mt[32], sh_zt[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    // Every thread of the block reaches the row reductions below.
    const float wr = row < rows ? w[row] : 0.0f;
    const bool active = wr > 0.0f;
    const long long base = (long long)row * cols;
    float ms = SERE_NEG_INF, zs = 0.0f, mt = SERE_NEG_INF, zt = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            ms_push(ms, zs, s[base + j] * inv_ts);
            ms_push(mt, zt, (t[base + j] - centre[j]) * inv_tt);
        }
    row_ms(ms, zs, sh_ms, sh_zs);
    row_ms(mt, zt, sh_mt, sh_zt);
    float cross = 0.0f;
    if (active) {
        const float inv_zs = 1.0f / zs, inv_zt = 1.0f / zt;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float sv = s[base + j] * inv_ts;
            const float q = expf((t[base + j] - centre[j]) * inv_tt - mt) * inv_zt;
            if (q > 0.0f) cross += q * (ms - sv);
            if (grad) {
                const float p = expf(sv - ms) * inv_zs;
                grad[base + j] += f * wr * (p - q);
            }
        }
    }
    cross = row_sum(cross, sh_ms);
    if (row < rows && threadIdx.x == 0) row_loss[row] = active ? wr * (logf(zs) + cross) : 0.0f;
}

// DINO's collapse monitor (sere-core `teacher_entropy`): per teacher row the
// entropy of q = softmax((t - c) / tau_t), evaluated as
// ln Z + sum_k q_k (m - z_k) (non-negative terms, no cancellation).
extern "C" __global__ void teacher_entropy_rows(const float* t, const float* centre,
                                                float* row_out, int rows, int dim,
                                                float inv_tt) {
    __shared__ float sh_m[32], sh_s[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * dim;
    float m = SERE_NEG_INF, z = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < dim; j += blockDim.x)
            ms_push(m, z, (t[base + j] - centre[j]) * inv_tt);
    row_ms(m, z, sh_m, sh_s);
    const float inv_z = 1.0f / z;
    float cross = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < dim; j += blockDim.x) {
            const float v = (t[base + j] - centre[j]) * inv_tt;
            const float q = expf(v - m) * inv_z;
            if (q > 0.0f) cross += q * (m - v);
        }
    cross = row_sum(cross, sh_m);
    if (active && threadIdx.x == 0) row_out[row] = logf(z) + cross;
}
