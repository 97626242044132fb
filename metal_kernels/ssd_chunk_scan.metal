// ssd_chunk_scan: phase 3 of the chunked SSD scan, the outputs: every chunk runs the recurrence
// from the state entering it (independent chunks, all in parallel).
// grid        (32, P, B*H*NC): one simdgroup per (sample, head, chunk, row p); lane l owns state
//             columns n = l, l+32, ... < N
// threadgroup (32, min(P, 8), 1)
// template    N (d_state), Q (chunk size), HAS_SEQ
// inputs      x (B, L, H, P), dt (B, L, H) fp32 after softplus, A (H,), B (B, L, G, N), C (B, L, G, N),
//             D (H,), seq_idx (B, L) int32 (read only if HAS_SEQ), E (B, NC, H, P, N) fp32
// outputs     y (B, L, H, P) fp32
// math        h = E_c; for t in chunk c: h = a_t h + dt_t x_t B_t^T with a_t = exp(dt_t A), 0 where
//             a sequence starts; y_t = h C_t + D x_t (sum over n by simd_sum).
constexpr int NPL = (N + 31) / 32;
const uint lane = thread_position_in_grid.x;
const uint pi = thread_position_in_grid.y;
const uint L = dt_shape[1];
const uint H = dt_shape[2];
const uint P = x_shape[3];
const uint G = B_shape[2];
const uint NC = (L + Q - 1) / Q;
const uint c = thread_position_in_grid.z % NC;
const uint bh = thread_position_in_grid.z / NC;
const uint bi = bh / H;
const uint hi = bh % H;
const uint gi = hi / (H / G);
const uint t0 = c * Q;
const uint t1 = metal::min(t0 + Q, L);
const float Ah = static_cast<float>(A[hi]);
const float Dh = static_cast<float>(D[hi]);

float s[NPL];
const size_t erow = (((size_t(bi) * NC + c) * H + hi) * P + pi) * N;
for (int j = 0; j < NPL; ++j) {
    const uint n = lane + 32 * j;
    s[j] = n < N ? E[erow + n] : 0.0f;
}
for (uint t = t0; t < t1; ++t) {
    const size_t bt = size_t(bi) * L + t;
    const float dtv = dt[bt * H + hi];
    const bool start = HAS_SEQ && t > 0 && seq_idx[bt] != seq_idx[bt - 1];
    const float a = start ? 0.0f : metal::exp(dtv * Ah);
    const size_t xi = (bt * H + hi) * P + pi;
    const float xv = static_cast<float>(x[xi]);
    const float u = dtv * xv;
    const size_t grow = (bt * G + gi) * N;
    float acc = 0.0f;
    for (int j = 0; j < NPL; ++j) {
        const uint n = lane + 32 * j;
        if (n < N) {
            s[j] = a * s[j] + u * static_cast<float>(B[grow + n]);
            acc += s[j] * static_cast<float>(C[grow + n]);
        }
    }
    acc = simd_sum(acc);
    if (lane == 0) y[xi] = acc + Dh * xv;
}
