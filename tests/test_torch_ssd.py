"""The chunked scans (matrix form) equal the plain sequential recurrences they implement."""

import pytest
import torch

from hnet_torch.ssd import ema_chunk_scan, ssd_chunk_scan, ssm_step

CHUNK = 8


def sequential_ssd(x, dt, A, B, C, D, seq_idx=None, initial_state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T (reset at sequence starts); y_t = C_t h_t + D x_t. fp64."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if initial_state is None else initial_state.double().clone()
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        Bh = B[:, t].double().repeat_interleave(h // g, 1)
        Ch = C[:, t].double().repeat_interleave(h // g, 1)
        decay = torch.exp(dt[:, t].double() * A.double())
        state = state * decay[..., None, None] + (dt[:, t].double()[..., None] * x[:, t].double())[..., None] * Bh[:, :, None]
        ys.append((state @ Ch[..., None]).squeeze(-1) + D.double()[:, None] * x[:, t].double())
    return torch.stack(ys, 1), state


def random_inputs(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, l, h, p, generator=gen), torch.rand(b, l, h, generator=gen) * 0.6,
            -torch.rand(h, generator=gen) * 3 - 0.1, torch.randn(b, l, g, n, generator=gen),
            torch.randn(b, l, g, n, generator=gen), torch.randn(h, generator=gen))


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_ssd_equals_sequential_recurrence(length, groups):
    x, dt, A, B, C, D = random_inputs(2, length, 4, 8, groups, 6)
    init = torch.randn(2, 4, 8, 6)
    y, final = ssd_chunk_scan(x, dt, A, B, C, CHUNK, D, initial_state=init)
    y_ref, final_ref = sequential_ssd(x, dt, A, B, C, D, initial_state=init)
    assert (y - y_ref).abs().max() < 1e-5
    assert (final - final_ref).abs().max() < 1e-5


@pytest.mark.parametrize("starts", [[0, 3], [0, 7, 8, 9], [0, 5, 16, 17, 30], [0, 1, 2, 3]])
def test_chunked_ssd_restarts_at_packed_sequence_boundaries(starts):
    length = 33
    x, dt, A, B, C, D = random_inputs(1, length, 4, 8, 1, 6, seed=1)
    seq_idx = torch.zeros(1, length, dtype=torch.long)
    for i, s in enumerate(starts):
        seq_idx[:, s:] = i
    y, final = ssd_chunk_scan(x, dt, A, B, C, CHUNK, D, seq_idx=seq_idx)
    y_ref, final_ref = sequential_ssd(x, dt, A, B, C, D, seq_idx=seq_idx)
    assert (y - y_ref).abs().max() < 1e-5
    assert (final - final_ref).abs().max() < 1e-5
    # and each sequence alone gives the same outputs
    bounds = starts + [length]
    for s, e in zip(bounds[:-1], bounds[1:]):
        y_alone, _ = ssd_chunk_scan(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], CHUNK, D)
        assert (y[:, s:e] - y_alone).abs().max() < 1e-5


def test_decode_step_equals_one_step_of_the_recurrence():
    x, dt_raw, A, B, C, D = random_inputs(3, 1, 4, 8, 1, 6, seed=2)
    dt_bias = torch.randn(4)
    state = torch.randn(3, 4, 8, 6)
    dt = torch.nn.functional.softplus(dt_raw + dt_bias)
    y, new_state = ssm_step(state, x[:, 0], dt_raw[:, 0], dt_bias, A, B[:, 0], C[:, 0], D)
    y_ref, state_ref = sequential_ssd(x, dt, A, B, C, D, initial_state=state)
    assert (y - y_ref[:, 0]).abs().max() < 1e-5
    assert (new_state - state_ref).abs().max() < 1e-5


@pytest.mark.parametrize("length", [1, 4, 5, 19])
def test_ema_scan_equals_sequential_ema(length):
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(2, length, 5, generator=gen)
    p = torch.rand(2, length, generator=gen).clamp(1e-4, 1 - 1e-4)
    z = ema_chunk_scan(v, p, chunk_size=4)
    ref, acc = [], torch.zeros(2, 5, dtype=torch.float64)
    for j in range(length):
        acc = p[:, j, None].double() * v[:, j].double() + (1 - p[:, j, None].double()) * acc
        ref.append(acc)
    assert (z - torch.stack(ref, 1)).abs().max() < 1e-6
