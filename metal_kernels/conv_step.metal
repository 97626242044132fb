// conv_step: one decode step of Mamba2's depthwise causal conv1d, fused with its state shift
// and the SiLU.
// grid        (C, B, 1): one thread per (channel, sample)
// threadgroup (min(C, 256), 1, 1)
// template    OutT (x's dtype), StateT (conv_state's dtype): explicit conversions on store
// inputs      conv_state (B, C, K) any float dtype S, x (B, C) dtype X, weight (C, K), bias (C,)
// outputs     out (B, C) dtype X, new_state (B, C, K) dtype S
// math        new_state[:, :, :K-1] = conv_state[:, :, 1:], new_state[:, :, K-1] = x (rounded to S);
//             out = silu(bias + sum_k new_state[:, :, k] * weight[:, k]), accumulated in fp32.
const uint ch = thread_position_in_grid.x;
const uint bi = thread_position_in_grid.y;
const uint C = conv_state_shape[1];
const uint K = conv_state_shape[2];
const size_t row = (size_t(bi) * C + ch) * K;
float acc = static_cast<float>(bias[ch]);
for (uint k = 0; k + 1 < K; ++k) {
    const float v = static_cast<float>(conv_state[row + k + 1]);
    new_state[row + k] = static_cast<StateT>(v);
    acc += v * static_cast<float>(weight[ch * K + k]);
}
new_state[row + K - 1] = static_cast<StateT>(static_cast<float>(x[size_t(bi) * C + ch]));
// read back: the tap uses the value as stored in the state's dtype, like the reference
acc += static_cast<float>(new_state[row + K - 1]) * static_cast<float>(weight[ch * K + K - 1]);
out[size_t(bi) * C + ch] = static_cast<OutT>(acc / (1.0f + metal::exp(-acc)));
