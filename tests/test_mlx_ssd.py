"""The pure-MLX recurrences behind hnet_mlx/kernels.py (the reference the Metal kernels are held to):
chunked SSD scan, decode step, dechunk EMA and conv step, checked against plain sequential loops
in numpy (float64) and against each other, with their exact contract signatures and dtypes."""

import mlx.core as mx
import numpy as np
import pytest

from hnet_mlx import kernels, ssd

RNG = np.random.default_rng(0)


def sequential_ssd(x, dt, A, B, C, D, seq_idx=None, init=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T (reset at sequence starts); y_t = C_t h_t + D x_t."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    state = np.zeros((b, h, p, n)) if init is None else init.astype(np.float64).copy()
    y = np.zeros((b, l, h, p))
    for t in range(l):
        if seq_idx is not None and t > 0:
            new = seq_idx[:, t] != seq_idx[:, t - 1]
            state[new] = 0.0
        for hh in range(h):
            gg = hh // (h // g)
            state[:, hh] = (np.exp(dt[:, t, hh] * A[hh])[:, None, None] * state[:, hh]
                            + (dt[:, t, hh, None] * x[:, t, hh])[:, :, None] * B[:, t, gg][:, None, :])
            y[:, t, hh] = np.einsum("bpn,bn->bp", state[:, hh], C[:, t, gg]) + D[hh] * x[:, t, hh]
    return y, state


def _inputs(b=2, l=29, h=4, p=8, g=2, n=16):
    x = RNG.standard_normal((b, l, h, p)).astype(np.float32)
    dt = (np.abs(RNG.standard_normal((b, l, h))) * 0.5).astype(np.float32)
    A = -np.abs(RNG.standard_normal(h)).astype(np.float32)
    B = RNG.standard_normal((b, l, g, n)).astype(np.float32)
    C = RNG.standard_normal((b, l, g, n)).astype(np.float32)
    D = RNG.standard_normal(h).astype(np.float32)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("with_seq, with_init", [(False, False), (True, False), (False, True), (True, True)])
def test_ssd_scan_equals_sequential_recurrence(with_seq, with_init):
    x, dt, A, B, C, D = _inputs()
    seq = np.sort(RNG.integers(0, 3, size=(2, 29)), axis=1).astype(np.int32) if with_seq else None
    init = RNG.standard_normal((2, 4, 8, 16)).astype(np.float32) if with_init else None
    y_ref, s_ref = sequential_ssd(x, dt, A, B, C, D, seq, init)
    y, s = kernels.ssd_scan(*map(mx.array, (x, dt, A, B, C)), 8, mx.array(D),
                            None if seq is None else mx.array(seq), None if init is None else mx.array(init), mode="off")
    assert y.dtype == mx.float32 and s.dtype == mx.float32
    assert y.shape == x.shape and s.shape == (2, 4, 8, 16)
    np.testing.assert_allclose(np.array(y), y_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(s), s_ref, atol=2e-4, rtol=1e-4)


def test_ssm_step_repeated_equals_the_scan():
    x, dt_soft, A, B, C, D = _inputs(l=11)
    dt_bias = RNG.standard_normal(4).astype(np.float32) * 0.1
    raw = np.log(np.expm1(dt_soft.astype(np.float64) + 1e-3)).astype(np.float32) - dt_bias  # softplus^-1
    dt = np.log1p(np.exp(raw + dt_bias))
    y_ref, s_ref = sequential_ssd(x, dt, A, B, C, D)
    state = mx.zeros((2, 4, 8, 16))
    ys = []
    for t in range(11):
        y, state = kernels.ssm_step(state, mx.array(x[:, t]), mx.array(raw[:, t]), mx.array(dt_bias), mx.array(A),
                                    mx.array(B[:, t]), mx.array(C[:, t]), mx.array(D), mode="off")
        ys.append(np.array(y))
    assert y.dtype == mx.float32 and state.dtype == mx.float32
    np.testing.assert_allclose(np.stack(ys, 1), y_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(state), s_ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("with_seq", [False, True])
def test_ema_dechunk_equals_sequential_ema_and_gather(with_seq):
    b, m, d, l = 2, 13, 6, 30
    values = RNG.standard_normal((b, m, d)).astype(np.float32)
    p = np.clip(RNG.random((b, m)), 1e-4, 1 - 1e-4).astype(np.float32)
    chunk_index = np.sort(RNG.integers(0, m, size=(b, l)), axis=1).astype(np.int32)
    seq = np.sort(RNG.integers(0, 2, size=(b, m)), axis=1).astype(np.int32) if with_seq else None
    z = np.zeros((b, m, d))
    for j in range(m):
        prev = z[:, j - 1] if j > 0 else np.zeros((b, d))
        if seq is not None and j > 0:
            prev = np.where((seq[:, j] != seq[:, j - 1])[:, None], 0.0, prev)
        z[:, j] = p[:, j, None] * values[:, j] + (1 - p[:, j, None]) * prev
    ref = np.take_along_axis(z, chunk_index[..., None], axis=1)
    out = kernels.ema_dechunk(mx.array(values), mx.array(p), mx.array(chunk_index),
                              None if seq is None else mx.array(seq), mode="off")
    assert out.dtype == mx.float32 and out.shape == (b, l, d)
    np.testing.assert_allclose(np.array(out), ref, atol=1e-5)


def test_conv_step_repeated_equals_causal_conv():
    b, c, k, l = 2, 10, 4, 9
    x = RNG.standard_normal((b, l, c)).astype(np.float32)
    w = RNG.standard_normal((c, k)).astype(np.float32)
    bias = RNG.standard_normal(c).astype(np.float32)
    full = kernels.causal_conv1d_silu(mx.array(x), mx.array(w), mx.array(bias), mode="off")
    state = mx.zeros((b, c, k))
    outs = []
    for t in range(l):
        y, state = kernels.conv_step(state, mx.array(x[:, t]), mx.array(w), mx.array(bias), mode="off")
        outs.append(np.array(y))
    assert state.shape == (b, c, k)
    np.testing.assert_allclose(np.stack(outs, 1), np.array(full), atol=1e-5)


def test_causal_conv_never_reads_across_a_sequence_start():
    x = RNG.standard_normal((1, 12, 3)).astype(np.float32)
    w, bias = RNG.standard_normal((3, 4)).astype(np.float32), np.zeros(3, np.float32)
    seq = np.array([[0] * 5 + [1] * 7], np.int32)
    packed = np.array(kernels.causal_conv1d_silu(mx.array(x), mx.array(w), mx.array(bias), seq_idx=mx.array(seq)))
    second = np.array(kernels.causal_conv1d_silu(mx.array(x[:, 5:]), mx.array(w), mx.array(bias)))
    np.testing.assert_allclose(packed[:, 5:], second, atol=1e-6)


def test_segsum_matches_definition():
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    out = np.array(ssd.segsum(mx.array(x)))
    for i in range(6):
        for j in range(6):
            want = x[:, j + 1 : i + 1].sum(-1) if j <= i else -np.inf
            np.testing.assert_allclose(out[:, i, j], want, atol=1e-5)


@pytest.mark.parametrize("offsets", [[0, 7], [1000, 3000], [20000, 60000]])
def test_rope_with_per_sample_offsets_matches_torch_rotary_at_any_position(offsets):
    import torch

    from hnet_mlx.attention import CausalMHA
    from hnet_torch.attention import apply_rotary as torch_rotary, rotary_cos_sin as torch_cos_sin

    attn = CausalMHA(64, 4, rotary_emb_dim=8)
    x = mx.array(RNG.standard_normal((2, 5, 64)).astype(np.float32))
    q, k, _ = attn._qkv(x, offset=mx.array(offsets))  # (b, h, l, d) through mx.fast.rope
    raw = np.array(attn.Wqkv(x)).reshape(2, 5, 3, 4, 16)
    pos = torch.tensor(offsets)[:, None] + torch.arange(5)[None]
    cos, sin = torch_cos_sin(pos, 8)
    for got, idx in ((q, 0), (k, 1)):
        want = torch_rotary(torch.tensor(raw[:, :, idx]), cos, sin).numpy()  # (b, l, h, d)
        np.testing.assert_allclose(np.array(got).transpose(0, 2, 1, 3), want, atol=2e-6)
