// ssd_dlog_decay: backward of the chunked SSD scan, the gradient of the per-step log decay
// l_t = dt_t A, as a segmented suffix sum over time.
// grid        (32, H, B): one simdgroup per (sample, head), walking blocks of 32 steps from the end
// threadgroup (32, 1, 1)
// template    HAS_SEQ
// inputs      q (B, L, H) fp32: q_t = <dy_t, y_t - D x_t> - dt_t ddt_t (plus <dfinal, final> at
//             t = L-1), see ssd.py; seq_idx (B, L) int32 (read only if HAS_SEQ)
// outputs     dl (B, L, H) fp32
// math        dl_t = sum of q_k over k = t .. the end of t's sequence, and 0 where a sequence
//             starts at t > 0 (that step's decay is cut, so it has no gradient). With cumulative
//             logs A_t, dL/dA_t = <dy_t, C_t h_t> - <dt_t x_t B_t^T, lam_t> = q_t, and l_t enters
//             every A_k, k >= t, of its sequence. The suffix sum in a block is a Hillis-Steele
//             scan over lanes with simd_shuffle_down, stopping at sequence ends; the carry from
//             the block to the right is lane 0's total.
const uint lane = thread_position_in_grid.x;
const uint hi = thread_position_in_grid.y;
const uint bi = thread_position_in_grid.z;
const uint L = q_shape[1];
const uint H = q_shape[2];
float carry = 0.0f;
for (int base = int((L - 1) / 32) * 32; base >= 0; base -= 32) {
    const uint t = uint(base) + lane;
    const bool valid = t < L;
    const size_t bt = size_t(bi) * L + t;
    float v = valid ? q[bt * H + hi] : 0.0f;
    // `stop`: the sequence of t ends inside the range summed so far (a new one starts after it)
    uint stop = (HAS_SEQ && t + 1 < L && seq_idx[bt + 1] != seq_idx[bt]) ? 1u : 0u;
    for (uint d = 1; d < 32; d <<= 1) {
        const float v_right = simd_shuffle_down(v, ushort(d));
        const uint stop_right = simd_shuffle_down(stop, ushort(d));
        if (stop == 0u && lane + d < 32) {
            v += v_right;
            stop = stop_right;
        }
    }
    const float total = stop != 0u ? v : v + carry;
    const bool start = HAS_SEQ && valid && t > 0 && seq_idx[bt] != seq_idx[bt - 1];
    if (valid) dl[bt * H + hi] = start ? 0.0f : total;
    carry = simd_shuffle(total, ushort(0));
}
