// ssm_step: one Mamba2 decode step for all heads in one launch (mamba's selective_state_update).
// grid        (32, P, B*H): one simdgroup per (sample, head, row p of the head's state); lane l
//             owns state columns n = l, l+32, ... < N
// threadgroup (32, min(P, 8), 1)
// inputs      state (B, H, P, N) fp32, x (B, H, P), dt (B, H) before softplus, dt_bias (H,), A (H,),
//             B (B, G, N), C (B, G, N), D (H,); G divides H, head h reads group h / (H / G)
// outputs     y (B, H, P) fp32, new_state (B, H, P, N) fp32
// math        dt' = softplus(dt + dt_bias) (x itself above 20, as torch), dA = exp(dt' A),
//             new_state = dA state + dt' x B^T, y = new_state C + D x (sum over n by simd_sum).
const uint lane = thread_position_in_grid.x;
const uint pi = thread_position_in_grid.y;
const uint bh = thread_position_in_grid.z;
const uint H = state_shape[1];
const uint P = state_shape[2];
const uint N = state_shape[3];
const uint G = B_shape[1];
const uint bi = bh / H;
const uint hi = bh % H;
const uint gi = hi / (H / G);

// softplus without log1p (Metal has none): log(1 + e) computed as log(u) * e / (u - 1), u = 1 + e,
// which is exact to a few ulp even when e is far below fp32 epsilon.
float dtv = static_cast<float>(dt[bh]) + static_cast<float>(dt_bias[hi]);
if (dtv <= 20.0f) {
    const float e = metal::exp(dtv);
    const float u = 1.0f + e;
    dtv = (u == 1.0f) ? e : metal::log(u) * (e / (u - 1.0f));
}
const float dA = metal::exp(dtv * static_cast<float>(A[hi]));
const float xv = static_cast<float>(x[size_t(bh) * P + pi]);
const float dx = dtv * xv;
const size_t srow = (size_t(bh) * P + pi) * N;
const size_t grow = (size_t(bi) * G + gi) * N;
float acc = 0.0f;
for (uint n = lane; n < N; n += 32) {
    const float s = state[srow + n] * dA + dx * static_cast<float>(B[grow + n]);
    new_state[srow + n] = s;
    acc += s * static_cast<float>(C[grow + n]);
}
acc = simd_sum(acc);
if (lane == 0) {
    y[size_t(bh) * P + pi] = acc + static_cast<float>(D[hi]) * xv;
}
