// ssd_state_passing: phase 2 of the chunked SSD scan, the sequential pass over chunks.
// grid        (P*N, H, B): one thread per state element of a (sample, head)
// threadgroup (min(P*N, 256), 1, 1)
// template    REVERSE, HAS_INIT
// inputs      S (B, NC, H, P, N) fp32 (from ssd_chunk_state), decay (B, NC, H) fp32,
//             init (B, H, P, N) fp32 (read only if HAS_INIT; zero otherwise)
// outputs     E (B, NC, H, P, N) fp32, last (B, H, P, N) fp32
// math        forward: E_0 = init, E_{c+1} = decay_c E_c + S_c; E_c is the state entering chunk c,
//               last = E_NC the final state.
//             REVERSE: E_{NC-1} = init (the final state's cotangent), E_{c-1} = S_c + decay_c E_c;
//               E_c is the adjoint reaching the end of chunk c from later positions, last = the
//               initial state's gradient.
const uint e = thread_position_in_grid.x;
const uint hi = thread_position_in_grid.y;
const uint bi = thread_position_in_grid.z;
const uint NC = S_shape[1];
const uint H = S_shape[2];
const uint PN = S_shape[3] * S_shape[4];
float st = HAS_INIT ? init[(size_t(bi) * H + hi) * PN + e] : 0.0f;
for (uint k = 0; k < NC; ++k) {
    const uint c = REVERSE ? NC - 1 - k : k;
    const size_t bc = (size_t(bi) * NC + c) * H + hi;
    E[bc * PN + e] = st;
    st = decay[bc] * st + S[bc * PN + e];
}
last[(size_t(bi) * H + hi) * PN + e] = st;
