// ssd_chunk_scan_bwd_x: backward of the chunked SSD scan, the gradients of x, dt (through the
// input term) and B (per head). Runs the adjoint recurrence of each chunk backwards in time from
// the adjoint reaching the chunk's end.
// grid        (32, SG, B*H*NC): one threadgroup per (sample, head, chunk); simdgroup g owns rows
//             p = g, g+SG, ... < P, lane l owns columns n = l, l+32, ... < N
// threadgroup (32, SG, 1)
// template    N (d_state), P (head dim), Q (chunk size), SG (simdgroups), HAS_SEQ
// inputs      x (B, L, H, P), dt (B, L, H) fp32, A (H,), B (B, L, G, N), C (B, L, G, N),
//             dy (B, L, H, P), D (H,), seq_idx (B, L) int32 (read only if HAS_SEQ),
//             M (B, NC, H, P, N) fp32: adjoint of the state at the end of each chunk from later
//             positions (ssd_state_passing, REVERSE)
// outputs     dx (B, L, H, P) fp32, ddt (B, L, H) fp32, dB (B, L, H, N) fp32
// math        lam_t = dy_t C_t^T + a_{t+1} lam_{t+1} (lam at the chunk's last step adds M_c);
//             r_t = lam_t B_t (sum over n by simd_sum); dx_t = dt_t r_t + D dy_t;
//             ddt_t = sum_p x_t r_t (only the input term; the decay term is ssd_dlog_decay's);
//             dB_t = dt_t sum_p x_t lam_t. Sums over p cross simdgroups through double-buffered
//             threadgroup memory (one barrier per step); column N of the buffer carries ddt.
constexpr int NPL = (N + 31) / 32;
constexpr int RPS = (P + SG - 1) / SG;
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
const float Dh = static_cast<float>(D[hi]);

threadgroup float red[2][SG][N + 1];

float lam[RPS][NPL];
for (int r = 0; r < RPS; ++r) {
    const uint pi = sg + SG * r;
    const size_t mrow = (((size_t(bi) * NC + c) * H + hi) * P + pi) * N;
    for (int j = 0; j < NPL; ++j) {
        const uint n = lane + 32 * j;
        lam[r][j] = (pi < P && n < N) ? M[mrow + n] : 0.0f;
    }
}
float a_next = 1.0f;  // the chunk's last step takes M_c undecayed
for (uint t = t1; t-- > t0;) {
    const size_t bt = size_t(bi) * L + t;
    const float dtv = dt[bt * H + hi];
    const bool start = HAS_SEQ && t > 0 && seq_idx[bt] != seq_idx[bt - 1];
    const size_t grow = (bt * G + gi) * N;
    float partB[NPL];
    for (int j = 0; j < NPL; ++j) partB[j] = 0.0f;
    float partdt = 0.0f;
    for (int r = 0; r < RPS; ++r) {
        const uint pi = sg + SG * r;
        const bool row = pi < P;  // rows past P still take part in simd_sum, with zeros
        const size_t xi = (bt * H + hi) * P + (row ? pi : 0);
        const float g = row ? static_cast<float>(dy[xi]) : 0.0f;
        const float xv = row ? static_cast<float>(x[xi]) : 0.0f;
        float rb = 0.0f;
        for (int j = 0; j < NPL; ++j) {
            const uint n = lane + 32 * j;
            if (n < N) {
                lam[r][j] = a_next * lam[r][j] + g * static_cast<float>(C[grow + n]);
                rb += lam[r][j] * static_cast<float>(B[grow + n]);
                partB[j] += xv * lam[r][j];
            }
        }
        rb = simd_sum(rb);
        if (row && lane == 0) {
            dx[xi] = dtv * rb + Dh * g;
            partdt += xv * rb;
        }
    }
    a_next = start ? 0.0f : metal::exp(dtv * Ah);
    const uint buf = (t1 - 1 - t) & 1;
    for (int j = 0; j < NPL; ++j) {
        const uint n = lane + 32 * j;
        if (n < N) red[buf][sg][n] = partB[j];
    }
    if (lane == 0) red[buf][sg][N] = partdt;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint n = tid; n <= N; n += 32 * SG) {
        float total = 0.0f;
        for (int q = 0; q < SG; ++q) total += red[buf][q][n];
        if (n < N) {
            dB[(bt * H + hi) * N + n] = dtv * total;
        } else {
            ddt[bt * H + hi] = total;
        }
    }
}
