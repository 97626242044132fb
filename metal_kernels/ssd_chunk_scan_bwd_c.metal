// ssd_chunk_scan_bwd_c: backward of the chunked SSD scan, the gradient of C (per head). Reruns
// the forward recurrence of each chunk from the state entering it.
// grid        (32, SG, B*H*NC): one threadgroup per (sample, head, chunk); simdgroup g owns rows
//             p = g, g+SG, ... < P, lane l owns columns n = l, l+32, ... < N
// threadgroup (32, SG, 1)
// template    N (d_state), P (head dim), Q (chunk size), SG (simdgroups), HAS_SEQ
// inputs      x (B, L, H, P), dt (B, L, H) fp32, A (H,), B (B, L, G, N), dy (B, L, H, P),
//             seq_idx (B, L) int32 (read only if HAS_SEQ), E (B, NC, H, P, N) fp32 entering states
// outputs     dC (B, L, H, N) fp32: dC[t, h, n] = sum_p dy_t[h, p] h_t[h, p, n] (the caller sums
//             the heads of a group)
// math        h = E_c; h = a_t h + dt_t x_t B_t^T as in ssd_chunk_scan; the sum over p crosses
//             simdgroups: partial sums go through threadgroup memory, double-buffered so one
//             barrier per step suffices.
constexpr int NPL = (N + 31) / 32;
constexpr int RPS = (P + SG - 1) / SG;  // rows per simdgroup
const uint lane = thread_position_in_threadgroup.x;
const uint sg = thread_position_in_threadgroup.y;
const uint tid = sg * 32 + lane;
const uint L = dt_shape[1];
const uint H = dt_shape[2];
const uint G = B_shape[2];
const uint NC = (L + Q - 1) / Q;
const uint c = threadgroup_position_in_grid.z % NC;
const uint bh = threadgroup_position_in_grid.z / NC;
const uint bi = bh / H;
const uint hi = bh % H;
const uint gi = hi / (H / G);
const uint t0 = c * Q;
const uint t1 = metal::min(t0 + Q, L);
const float Ah = static_cast<float>(A[hi]);

threadgroup float red[2][SG][N];

float s[RPS][NPL];
for (int r = 0; r < RPS; ++r) {
    const uint pi = sg + SG * r;
    const size_t erow = (((size_t(bi) * NC + c) * H + hi) * P + pi) * N;
    for (int j = 0; j < NPL; ++j) {
        const uint n = lane + 32 * j;
        s[r][j] = (pi < P && n < N) ? E[erow + n] : 0.0f;
    }
}
for (uint t = t0; t < t1; ++t) {
    const size_t bt = size_t(bi) * L + t;
    const float dtv = dt[bt * H + hi];
    const bool start = HAS_SEQ && t > 0 && seq_idx[bt] != seq_idx[bt - 1];
    const float a = start ? 0.0f : metal::exp(dtv * Ah);
    const size_t grow = (bt * G + gi) * N;
    float part[NPL];
    for (int j = 0; j < NPL; ++j) part[j] = 0.0f;
    for (int r = 0; r < RPS; ++r) {
        const uint pi = sg + SG * r;
        if (pi >= P) continue;
        const size_t xi = (bt * H + hi) * P + pi;
        const float u = dtv * static_cast<float>(x[xi]);
        const float g = static_cast<float>(dy[xi]);
        for (int j = 0; j < NPL; ++j) {
            const uint n = lane + 32 * j;
            if (n < N) {
                s[r][j] = a * s[r][j] + u * static_cast<float>(B[grow + n]);
                part[j] += g * s[r][j];
            }
        }
    }
    const uint buf = (t - t0) & 1;
    for (int j = 0; j < NPL; ++j) {
        const uint n = lane + 32 * j;
        if (n < N) red[buf][sg][n] = part[j];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint n = tid; n < N; n += 32 * SG) {
        float total = 0.0f;
        for (int q = 0; q < SG; ++q) total += red[buf][q][n];
        dC[(bt * H + hi) * N + n] = total;
    }
}
