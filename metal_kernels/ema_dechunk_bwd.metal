// ema_dechunk_bwd: backward of ema_dechunk, the reverse EMA fused with the scatter-add of the
// byte gradients into their chunks.
// grid        (D, B, 1): one thread per (feature, sample), walking the chunks from the last
// threadgroup (min(D, 256), 1, 1)
// template    HAS_SEQ
// inputs      values (B, M, D), p (B, M) fp32, chunk_index (B, L) int32, seq_idx (B, M) int32 (read
//             only if HAS_SEQ), z (B, M, D) fp32 (forward EMA), dout (B, L, D) fp32,
//             dz (B, M, D) fp32 (cotangent of the z output; zeros when unused)
// outputs     dvalues (B, M, D) fp32, dp (B, M, NB) fp32: per threadgroup of the D axis (NB of
//             them) the partial sum over its features; the caller sums the last axis
// math        g_j = dz_j + sum_{t: chunk_index_t = j} dout_t;  mu_j = g_j + (1 - p_{j+1}) mu_{j+1}
//             (no carry into a chunk where a sequence ends);  dvalues_j = p_j mu_j;
//             dp_j = sum_d mu_j (v_j - z_{j-1}) (z_{j-1} = 0 where a sequence starts). The sum over
//             d: simd_sum, then threadgroup memory (double-buffered: one barrier per chunk).
const uint di = thread_position_in_grid.x;
const uint bi = thread_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint M = values_shape[1];
const uint Dm = values_shape[2];
const uint L = chunk_index_shape[1];
const uint NB = threadgroups_per_grid.x;

threadgroup float red[2][8];

int t = int(L) - 1;
float carry = 0.0f;
for (int j = int(M) - 1; j >= 0; --j) {
    const size_t bj = size_t(bi) * M + j;
    float g = dz[bj * Dm + di];
    // bytes of chunk j (indices past M - 1 count for the last chunk, as in the forward's clamp)
    while (t >= 0 && chunk_index[size_t(bi) * L + t] >= j) {
        g += dout[(size_t(bi) * L + t) * Dm + di];
        --t;
    }
    const float mu = g + carry;
    const float pj = p[bj];
    const bool start = j == 0 || (HAS_SEQ && seq_idx[bj] != seq_idx[bj - 1]);
    const float zprev = start ? 0.0f : z[(bj - 1) * Dm + di];
    dvalues[bj * Dm + di] = pj * mu;
    carry = start ? 0.0f : (1.0f - pj) * mu;
    const float part = simd_sum(mu * (static_cast<float>(values[bj * Dm + di]) - zprev));
    const uint buf = uint(j) & 1u;
    if (lane == 0) red[buf][sg] = part;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (thread_index_in_threadgroup == 0) {
        float total = 0.0f;
        for (uint q = 0; q < simdgroups_per_threadgroup; ++q) total += red[buf][q];
        dp[bj * NB + threadgroup_position_in_grid.x] = total;
    }
}
