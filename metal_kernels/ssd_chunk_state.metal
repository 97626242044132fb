// ssd_chunk_state: each chunk's own contribution to the state passed between chunks, from a zero
// start, plus the chunk's total decay. Phase 1 of the chunked SSD scan (forward) and of its
// backward (REVERSE: the adjoint).
// grid        (32, P, B*H*NC): one simdgroup per (sample, head, chunk, row p); NC = ceil(L / Q);
//             lane l owns state columns n = l, l+32, ... < N
// threadgroup (32, min(P, 8), 1)
// template    N (d_state), Q (chunk size), REVERSE, HAS_SEQ
// inputs      v (B, L, H, P), dt (B, L, H) fp32 after softplus, A (H,), W (B, L, G, N),
//             seq_idx (B, L) int32 (read only if HAS_SEQ)
// outputs     S (B, NC, H, P, N) fp32, decay (B, NC, H) fp32
// math        a_t = exp(dt_t A), cut to 0 at t > 0 where seq_idx changes (a sequence starts).
//             forward: S_c = sum_{t in c} (prod_{s in (t, end c]} a_s) dt_t v_t W_t^T, the state at the
//               end of chunk c had it started from zero (v = x, W = B);
//             REVERSE: S_c = a_{t0} sum_{t in c} (prod_{s in (t0, t]} a_s) v_t W_t^T, the adjoint that
//               chunk c's own outputs send to the state before it (v = dy, W = C);
//             decay_c = prod_{t in c} a_t (0 if a sequence starts inside the chunk, t0 included).
constexpr int NPL = (N + 31) / 32;
const uint lane = thread_position_in_grid.x;
const uint pi = thread_position_in_grid.y;
const uint L = dt_shape[1];
const uint H = dt_shape[2];
const uint P = v_shape[3];
const uint G = W_shape[2];
const uint NC = (L + Q - 1) / Q;
const uint c = thread_position_in_grid.z % NC;
const uint bh = thread_position_in_grid.z / NC;
const uint bi = bh / H;
const uint hi = bh % H;
const uint gi = hi / (H / G);
const uint t0 = c * Q;
const uint t1 = metal::min(t0 + Q, L);
const float Ah = static_cast<float>(A[hi]);

float s[NPL];
for (int j = 0; j < NPL; ++j) s[j] = 0.0f;
float log_total = 0.0f;
bool cut = false;
if (!REVERSE) {
    for (uint t = t0; t < t1; ++t) {
        const size_t bt = size_t(bi) * L + t;
        const float dtv = dt[bt * H + hi];
        const bool start = HAS_SEQ && t > 0 && seq_idx[bt] != seq_idx[bt - 1];
        const float a = start ? 0.0f : metal::exp(dtv * Ah);
        cut = cut || start;
        log_total += dtv * Ah;
        const float u = dtv * static_cast<float>(v[(bt * H + hi) * P + pi]);
        const size_t wrow = (bt * G + gi) * N;
        for (int j = 0; j < NPL; ++j) {
            const uint n = lane + 32 * j;
            if (n < N) s[j] = a * s[j] + u * static_cast<float>(W[wrow + n]);
        }
    }
} else {
    float a_next = 1.0f;  // decay of the step after t (none for the chunk's last step: s is zero)
    for (uint t = t1; t-- > t0;) {
        const size_t bt = size_t(bi) * L + t;
        const float dtv = dt[bt * H + hi];
        const bool start = HAS_SEQ && t > 0 && seq_idx[bt] != seq_idx[bt - 1];
        cut = cut || start;
        log_total += dtv * Ah;
        const float u = static_cast<float>(v[(bt * H + hi) * P + pi]);
        const size_t wrow = (bt * G + gi) * N;
        for (int j = 0; j < NPL; ++j) {
            const uint n = lane + 32 * j;
            if (n < N) s[j] = a_next * s[j] + u * static_cast<float>(W[wrow + n]);
        }
        a_next = start ? 0.0f : metal::exp(dtv * Ah);
    }
    for (int j = 0; j < NPL; ++j) s[j] *= a_next;  // through step t0 into the state before the chunk
}
const size_t out_row = ((size_t(bi) * NC + c) * H + hi) * P + pi;
for (int j = 0; j < NPL; ++j) {
    const uint n = lane + 32 * j;
    if (n < N) S[out_row * N + n] = s[j];
}
if (pi == 0 && lane == 0) {
    decay[(size_t(bi) * NC + c) * H + hi] = cut ? 0.0f : metal::exp(log_total);
}
