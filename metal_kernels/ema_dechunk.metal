// ema_dechunk: H-Net's dechunk (paper eq. 5-6), the EMA over the chunk sequence fused with the
// gather back to byte positions.
// grid        (D, B, 1): one thread per (feature, sample), walking the bytes in order
// threadgroup (min(D, 256), 1, 1)
// template    HAS_SEQ
// inputs      values (B, M, D) any float dtype, p (B, M) fp32 clamped to [1e-4, 1-1e-4],
//             chunk_index (B, L) int32 nondecreasing from 0 (cumsum(boundary) - 1, clamped at 0),
//             seq_idx (B, M) int32 (read only if HAS_SEQ)
// outputs     out (B, L, D) fp32, z (B, M, D) fp32 (the EMA itself, kept for the backward)
// math        z_j = p_j v_j + (1 - p_j) z_{j-1}, z_{-1} = 0, restarting (z_{j-1} = 0) where seq_idx
//             changes; out_t = z_{chunk_index_t}. Every z_j, j < M, is written, also for chunks no
//             byte points to (padding rows).
const uint di = thread_position_in_grid.x;
const uint bi = thread_position_in_grid.y;
const uint M = values_shape[1];
const uint Dm = values_shape[2];
const uint L = chunk_index_shape[1];
float zc = 0.0f;
int j = -1;
for (uint t = 0; t <= L; ++t) {
    // t == L: finish the chunks after the last byte's
    const int target = t < L ? metal::min(chunk_index[size_t(bi) * L + t], int(M) - 1) : int(M) - 1;
    while (j < target) {
        ++j;
        const size_t bj = size_t(bi) * M + j;
        const float pj = p[bj];
        const bool start = j == 0 || (HAS_SEQ && seq_idx[bj] != seq_idx[bj - 1]);
        const float vj = static_cast<float>(values[bj * Dm + di]);
        zc = start ? pj * vj : pj * vj + (1.0f - pj) * zc;
        z[bj * Dm + di] = zc;
    }
    if (t < L) out[(size_t(bi) * L + t) * Dm + di] = zc;
}
