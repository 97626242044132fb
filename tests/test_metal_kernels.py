"""hnet_metal_kernels against hnet_mlx's pure-MLX paths: every kernel, forward and gradients,
over the shapes that matter (sizes not multiples of 32, d_state 16/64/128, headdim 32/64, one and
several chunks, sequence boundaries, batch > 1, fp32/fp16/bf16 inputs).

Each test runs twice: through the CPU emulator (always) and through real Metal
(`mx.fast.metal_kernel`, only on Apple silicon; skipped elsewhere). Deliberately broken variants of
the shipped kernels check that the emulator reports an off-by-one index, a missing barrier, an
out-of-bounds write and barrier divergence.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import hnet_metal_kernels as hk
from hnet_metal_kernels.emulator import EmulatorError, clang, compiler_available
from hnet_mlx import kernels as mlx_kernels
from hnet_mlx import ssd as ref

F32 = mx.float32
METAL = bool(mx.metal.is_available())


@pytest.fixture(params=[
    "emulator",
    pytest.param("metal", marks=[pytest.mark.metal, pytest.mark.skipif(not METAL, reason="needs Apple silicon (Metal)")]),
])
def factory(request):
    if request.param == "metal":
        return hk.MetalFactory()
    if not compiler_available():
        pytest.skip("the Metal emulator needs g++ (apt-get install g++)")
    return hk.EmulatorFactory()


needs_emulator = pytest.mark.skipif(not compiler_available(), reason="the Metal emulator needs g++ (apt-get install g++)")


def rng_arrays(seed: int):
    rng = np.random.default_rng(seed)

    def normal(*shape, dtype=F32, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)

    return rng, normal


def close(actual: mx.array, expected: mx.array, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max(|expected|, 1e-3): relative to the tensor's scale."""
    a = np.array(actual.astype(F32))
    e = np.array(expected.astype(F32))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    err = float(np.abs(a - e).max()) if a.size else 0.0
    scale = max(float(np.abs(e).max()) if e.size else 0.0, 1e-3)
    assert err <= tol * scale, f"{what}: max abs diff {err:.3g} > {tol:g} x {scale:.3g}"


# -- decode step: ssm_step ------------------------------------------------------------------

SSM_STEP_CASES = {  # b, h, p, n, g, dtype
    "xl_head_fp32": (1, 2, 64, 128, 1, F32),
    "dstate16_groups_fp32": (3, 4, 32, 16, 2, F32),
    "headdim20_dstate64_fp16": (2, 3, 20, 64, 1, mx.float16),
    "bf16": (2, 2, 32, 64, 2, mx.bfloat16),
}


@pytest.mark.parametrize("case", sorted(SSM_STEP_CASES))
def test_ssm_step_matches_pure_mlx(case, factory):
    b, h, p, n, g, dtype = SSM_STEP_CASES[case]
    _, normal = rng_arrays(1)
    state = normal(b, h, p, n)
    x, dt = normal(b, h, p, dtype=dtype), normal(b, h, dtype=dtype, scale=3.0)
    dt_bias, A, D = normal(h), -mx.exp(normal(h)), normal(h)
    B, C = normal(b, g, n, dtype=dtype), normal(b, g, n, dtype=dtype)
    dt = mx.concatenate([dt[:, :1] * 0 + 30.0, dt[:, 1:]], axis=1) if h > 1 else dt  # the softplus threshold
    y, new_state = hk.ssm_step(state, x, dt, dt_bias, A, B, C, D, factory=factory)
    y_ref, state_ref = ref.ssm_step(state, x, dt, dt_bias, A, B, C, D)
    assert y.dtype == F32 and new_state.dtype == F32
    close(y, y_ref, 1e-5, "y")
    close(new_state, state_ref, 1e-5, "state")


# -- decode step: conv_step -----------------------------------------------------------------

CONV_CASES = {  # b, c, k, x dtype, state dtype
    "c40_fp32": (2, 40, 4, F32, F32),
    "c300_fp16_state_fp32": (1, 300, 4, mx.float16, F32),
    "c70_bf16_k3": (3, 70, 3, mx.bfloat16, mx.bfloat16),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_step_matches_pure_mlx(case, factory):
    b, c, k, xdt, sdt = CONV_CASES[case]
    _, normal = rng_arrays(2)
    conv_state, x = normal(b, c, k, dtype=sdt), normal(b, c, dtype=xdt)
    weight, bias = normal(c, k, dtype=xdt), normal(c, dtype=xdt)
    out, new_state = hk.conv_step(conv_state, x, weight, bias, factory=factory)
    out_ref, state_ref = mlx_kernels.conv_step(conv_state, x, weight, bias, mode="off")
    assert out.dtype == out_ref.dtype and new_state.dtype == state_ref.dtype
    np.testing.assert_array_equal(np.array(new_state.astype(F32)), np.array(state_ref.astype(F32)))
    # the pure path rounds products and sums to the activation dtype; the kernel accumulates in fp32
    close(out, out_ref, 1e-5 if xdt == F32 and sdt == F32 else 2e-2, "out")


# -- chunked SSD scan: forward and gradients ------------------------------------------------

SSD_CASES = {  # b, l, h, p, n, g, Q, dtype, seq_idx, initial_state, padding mask
    "one_chunk": (1, 5, 2, 32, 16, 1, 8, F32, False, False, False),
    "chunks_groups_seq_init": (2, 37, 4, 24, 16, 2, 8, F32, True, True, False),
    "dstate64_seq": (1, 19, 2, 32, 64, 1, 8, F32, True, False, False),
    "dstate128_headdim64": (1, 12, 2, 64, 128, 1, 8, F32, False, True, False),
    "masked_batch": (3, 21, 2, 32, 16, 1, 8, F32, False, False, True),
    "chunk64_long": (1, 150, 1, 32, 16, 1, 64, F32, True, False, False),
    "fp16_inputs": (2, 17, 2, 32, 16, 1, 8, mx.float16, False, True, False),
    "bf16_inputs_seq": (2, 17, 2, 32, 16, 2, 8, mx.bfloat16, True, False, False),
}


def _ssd_inputs(b, l, h, p, n, g, dtype, with_seq, with_init, with_mask, seed=3):
    rng, normal = rng_arrays(seed)
    x = normal(b, l, h, p, dtype=dtype)
    dt = mx.exp(normal(b, l, h) - 2.0)
    A = -mx.exp(normal(h))
    B, C = normal(b, l, g, n, dtype=dtype), normal(b, l, g, n, dtype=dtype)
    D = normal(h)
    seq = None
    if with_seq:  # sequence starts mid-chunk, on a chunk edge, and a length-1 sequence
        cuts = sorted({3, 8, 9, min(l - 1, 13)} & set(range(1, l)))
        ids = np.zeros((b, l), np.int32)
        for row in range(b):
            for c in cuts[row % 2 :]:
                ids[row, c:] += 1
        seq = mx.array(ids)
    init = normal(b, h, p, n) if with_init else None
    if with_mask:  # right padding: dt = 0 passes the state through unchanged (hnet_mlx.mamba2)
        lengths = np.array([l, l - 5, 1][:b])
        mask = mx.array(np.arange(l)[None] < lengths[:, None])
        dt = dt * mask[..., None]
    return x, dt, A, B, C, D, seq, init


def _ssd_loss(fn, Q, seq, wy, wf):
    def loss(x, dt, A, B, C, D, init):
        y, final = fn(x, dt, A, B, C, Q, D, seq, init)
        return (y * wy).sum() + (final * wf).sum()

    return loss


@pytest.mark.parametrize("case", sorted(SSD_CASES))
def test_ssd_scan_forward_and_gradients_match_pure_mlx(case, factory):
    b, l, h, p, n, g, Q, dtype, with_seq, with_init, with_mask = SSD_CASES[case]
    x, dt, A, B, C, D, seq, init = _ssd_inputs(b, l, h, p, n, g, dtype, with_seq, with_init, with_mask)
    kernel = lambda *a, **k: hk.ssd_scan(*a, **k, factory=factory)  # noqa: E731
    y, final = kernel(x, dt, A, B, C, Q, D, seq, init)
    y_ref, final_ref = ref.ssd_chunk_scan(x, dt, A, B, C, Q, D, seq, init)
    assert y.dtype == F32 and final.dtype == F32
    close(y, y_ref, 2e-5, "y")
    close(final, final_ref, 2e-5, "final state")

    _, normal = rng_arrays(4)
    wy, wf = normal(*y.shape), normal(*final.shape)
    argnums = [0, 1, 2, 3, 4, 5] + ([6] if with_init else [])
    args = (x, dt, A, B, C, D, init)
    grads = mx.grad(_ssd_loss(kernel, Q, seq, wy, wf), argnums=argnums)(*args)
    grads_ref = mx.grad(_ssd_loss(ref.ssd_chunk_scan, Q, seq, wy, wf), argnums=argnums)(*args)
    tol = 1e-4 if dtype == F32 else 1e-2  # low-precision gradients are rounded to the input dtype
    for name, gk, gr in zip(["dx", "ddt", "dA", "dB", "dC", "dD", "dinit"], grads, grads_ref):
        assert gk.dtype == gr.dtype, name
        # dA sums dl_t dt_t over the sequence with heavy cancellation (see ssd_dlog_decay.metal); with
        # these synthetic inputs its error reaches ~4e-4 of |dA| (at H-Net's init ranges ~1e-5, below)
        close(gk, gr, max(tol, 1e-3) if name == "dA" else tol, name)


def _float64_recurrence_grads(x, dt, A, B, C, D, seq, wy, wf):
    """Gradients of sum(y wy) + sum(final wf) through the plain sequential recurrence, in float64."""
    torch = pytest.importorskip("torch")
    T = lambda a: torch.tensor(np.array(a), dtype=torch.float64, requires_grad=True)  # noqa: E731
    xt, dtt, At, Bt, Ct, Dt = T(x), T(dt), T(A), T(B), T(C), T(D)
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    ids = np.array(seq)
    state = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(l):
        decay = torch.exp(dtt[:, t] * At)  # (b, h)
        if t > 0:  # a new sequence starts: the state restarts
            decay = decay * torch.tensor(ids[:, t] == ids[:, t - 1], dtype=torch.float64)[:, None]
        Bh, Ch = Bt[:, t].repeat_interleave(rep, 1), Ct[:, t].repeat_interleave(rep, 1)
        state = state * decay[..., None, None] + (dtt[:, t, :, None] * xt[:, t])[..., None] * Bh[:, :, None]
        ys.append((state * Ch[:, :, None]).sum(-1) + Dt[:, None] * xt[:, t])
    w = lambda a: torch.tensor(np.array(a), dtype=torch.float64)  # noqa: E731
    ((torch.stack(ys, 1) * w(wy)).sum() + (state * w(wf)).sum()).backward()
    return [t.grad.numpy() for t in (xt, dtt, At, Bt, Ct, Dt)]


def test_ssd_gradients_at_hnet_init_ranges_match_a_float64_recurrence(factory):
    """dt in [1e-3, 0.1] and A in [-16, -1] (mamba_ssm's init, which H-Net keeps), several chunks and
    sequences: every gradient, dA included, within 1e-4 of the float64 sequential recurrence."""
    rng = np.random.default_rng(11)
    b, l, h, p, n, g, Q = 1, 96, 2, 32, 16, 1, 32
    f32 = lambda a: mx.array(np.asarray(a, dtype=np.float32))  # noqa: E731
    x, B, C = (f32(rng.standard_normal(s)) for s in ((b, l, h, p), (b, l, g, n), (b, l, g, n)))
    dt = f32(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (b, l, h))))
    A, D = f32(-rng.uniform(1, 16, h)), f32(rng.standard_normal(h))
    pos = np.arange(l)
    seq = mx.array(((pos >= 40).astype(np.int32) + (pos >= 70))[None])  # starts mid-chunk
    wy, wf = f32(rng.standard_normal((b, l, h, p))), f32(rng.standard_normal((b, h, p, n)))
    kernel = lambda *a: hk.ssd_scan(*a, factory=factory)  # noqa: E731
    grads = mx.grad(_ssd_loss(kernel, Q, seq, wy, wf), argnums=[0, 1, 2, 3, 4, 5])(x, dt, A, B, C, D, None)
    truth = _float64_recurrence_grads(x, dt, A, B, C, D, seq, wy, wf)
    for name, gk, gt in zip(["dx", "ddt", "dA", "dB", "dC", "dD"], grads, truth):
        close(gk, mx.array(gt.astype(np.float32)), 1e-4, name)


def test_ssd_scan_without_D_and_with_empty_sequence(factory):
    x, dt, A, B, C, _, _, _ = _ssd_inputs(1, 9, 2, 32, 16, 1, F32, False, False, False)
    y, final = hk.ssd_scan(x, dt, A, B, C, 4, factory=factory)
    y_ref, final_ref = ref.ssd_chunk_scan(x, dt, A, B, C, 4)
    close(y, y_ref, 2e-5, "y")
    close(final, final_ref, 2e-5, "final")
    y0, f0 = hk.ssd_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], 4, factory=factory)
    assert y0.shape == (1, 0, 2, 32) and not bool(f0.any())


# -- dechunk EMA: forward and gradients -----------------------------------------------------

EMA_CASES = {  # b, l, d, dtype, packed (seq_idx)
    "d40_batch": (2, 25, 40, F32, False),
    "d300_two_threadgroups_seq": (1, 40, 300, F32, True),
    "fp16_values": (2, 31, 33, mx.float16, False),
    "bf16_values_seq": (1, 30, 64, mx.bfloat16, True),
}


def _ema_inputs(b, l, d, dtype, packed, seed=5):
    """Boundary masks -> chunk values, p, chunk_index as hnet_mlx.dechunk builds them; row 1 starts
    without a boundary (chunk_index clamped at 0) and has fewer chunks than m (padding chunks)."""
    rng, normal = rng_arrays(seed)
    mask = rng.random((b, l)) < 0.35
    mask[0, 0] = True
    if b > 1:
        mask[1, 0] = False
        mask[1, l // 2 :] = False
    counts = mask.sum(1)
    m = int(max(counts.max(), 1))
    chunk_index = mx.array(np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32))
    p = mx.clip(mx.array(rng.random((b, m)).astype(np.float32)), 1e-4, 1 - 1e-4)
    values = normal(b, m, d, dtype=dtype)
    seq = None
    if packed:  # two sequences in one row, split mid-way through the chunks
        ids = np.zeros((b, m), np.int32)
        ids[:, m // 2 :] = 1
        seq = mx.array(ids)
    return values, p, chunk_index, seq


@pytest.mark.parametrize("case", sorted(EMA_CASES))
def test_ema_dechunk_forward_and_gradients_match_pure_mlx(case, factory):
    b, l, d, dtype, packed = EMA_CASES[case]
    values, p, chunk_index, seq = _ema_inputs(b, l, d, dtype, packed)
    out = hk.ema_dechunk(values, p, chunk_index, seq, factory=factory)
    out_ref = ref.ema_dechunk(values, p, chunk_index, seq)
    assert out.dtype == F32
    close(out, out_ref, 2e-5, "out")

    _, normal = rng_arrays(6)
    w = normal(*out.shape)
    grads = mx.grad(lambda v, q: (hk.ema_dechunk(v, q, chunk_index, seq, factory=factory) * w).sum(), argnums=[0, 1])(values, p)
    grads_ref = mx.grad(lambda v, q: (ref.ema_dechunk(v, q, chunk_index, seq) * w).sum(), argnums=[0, 1])(values, p)
    tol = 1e-4 if dtype == F32 else 1e-2
    for name, gk, gr in zip(["dvalues", "dp"], grads, grads_ref):
        assert gk.dtype == gr.dtype, name
        close(gk, gr, tol, name)


# -- every kernel passes the clang address-space check ---------------------------------------


@needs_emulator
@pytest.mark.skipif(clang() is None, reason="clang++ not installed (apt-get install clang): address-space check unavailable")
def test_every_kernel_passes_the_address_space_check():
    """Forward and backward of every wrapper, with the check forced on (it also runs by default
    whenever clang++ is installed); fp32 and bf16 so both signature variants are checked."""
    fac = hk.EmulatorFactory(orders=1, check_address_spaces=True)
    for dtype in (F32, mx.bfloat16):
        x, dt, A, B, C, D, seq, init = _ssd_inputs(1, 9, 2, 32, 16, 1, dtype, True, True, False)
        mx.eval(mx.grad(lambda x, init: hk.ssd_scan(x, dt, A, B, C, 4, D, seq, init, factory=fac)[0].sum(),
                        argnums=[0, 1])(x, init))
        values, p, chunk_index, seq = _ema_inputs(1, 12, 40, dtype, True)
        mx.eval(mx.grad(lambda v: hk.ema_dechunk(v, p, chunk_index, seq, factory=fac).sum())(values))
        _, normal = rng_arrays(7)
        mx.eval(hk.ssm_step(normal(1, 2, 8, 16), normal(1, 2, 8, dtype=dtype), normal(1, 2), normal(2), normal(2),
                            normal(1, 1, 16, dtype=dtype), normal(1, 1, 16, dtype=dtype), normal(2), factory=fac))
        mx.eval(hk.conv_step(normal(1, 8, 4, dtype=dtype), normal(1, 8, dtype=dtype), normal(8, 4), normal(8), factory=fac))


# -- deliberately broken variants of the shipped kernels ------------------------------------


class Mutated(hk.EmulatorFactory):
    """The emulator, with one kernel's body edited (a bug planted on purpose)."""

    def __init__(self, kernel: str, old: str, new: str):
        super().__init__(check_address_spaces=False)
        self.kernel, self.old, self.new = kernel, old, new

    def metal_kernel(self, name, input_names, output_names, source, *args, **kwargs):
        if name == self.kernel:
            assert self.old in source, f"{self.old!r} not in {name}"
            source = source.replace(self.old, self.new)
        return super().metal_kernel(name, input_names, output_names, source, *args, **kwargs)


def _small_step_inputs():
    _, normal = rng_arrays(8)
    return (normal(2, 2, 8, 16), normal(2, 2, 8), normal(2, 2), normal(2), -mx.exp(normal(2)), normal(2, 1, 16),
            normal(2, 1, 16), normal(2))


@needs_emulator
def test_off_by_one_index_in_ssm_step_is_reported():
    args = _small_step_inputs()
    hk.ssm_step(*args, factory=hk.EmulatorFactory())  # the shipped kernel is clean
    broken = Mutated("hnet_ssm_step", "n < N;", "n <= N;")
    with pytest.raises(EmulatorError) as err:
        mx.eval(hk.ssm_step(*args, factory=broken))
    text = str(err.value)
    assert "past the end of output 'new_state'" in text and "differs between" in text


@needs_emulator
def test_missing_barrier_in_ssd_backward_is_reported():
    x, dt, A, B, C, D, seq, init = _ssd_inputs(1, 9, 2, 32, 16, 1, F32, True, False, False)
    broken = Mutated("hnet_ssd_chunk_scan_bwd_x", "threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    with pytest.raises(EmulatorError, match="differs between the ascending and descending thread orders"):
        mx.eval(mx.grad(lambda x: hk.ssd_scan(x, dt, A, B, C, 4, D, seq, factory=broken)[0].sum())(x))


@needs_emulator
def test_missing_barrier_in_ema_backward_is_reported():
    values, p, chunk_index, seq = _ema_inputs(1, 20, 70, F32, False)
    broken = Mutated("hnet_ema_dechunk_bwd", "threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    with pytest.raises(EmulatorError, match="differs between|poison"):
        mx.eval(mx.grad(lambda q: hk.ema_dechunk(values, q, chunk_index, seq, factory=broken).sum())(p))


@needs_emulator
def test_out_of_bounds_write_in_conv_step_is_reported():
    """A launch rounded up to whole simdgroups over a body without a bounds check."""
    _, normal = rng_arrays(9)
    conv_state, x, weight, bias = normal(2, 40, 4), normal(2, 40), normal(40, 4), normal(40)
    kernel = hk.EmulatorFactory().metal_kernel("hnet_conv_step", ["conv_state", "x", "weight", "bias"],
                                               ["out", "new_state"], hk.sources.source("conv_step"))
    with pytest.raises(EmulatorError, match="past the end of output"):
        kernel(inputs=[conv_state, x, weight, bias], template=[("OutT", F32), ("StateT", F32)],
               grid=(64, 2, 1), threadgroup=(64, 1, 1),
               output_shapes=[(2, 40), (2, 40, 4)], output_dtypes=[F32, F32])


@needs_emulator
def test_barrier_divergence_in_ema_backward_is_reported():
    """A bounds check by early return, with the grid rounded up: returned threads skip the barrier."""
    values, p, chunk_index, seq = _ema_inputs(1, 20, 40, F32, False)
    broken = Mutated("hnet_ema_dechunk_bwd", "int t = int(L) - 1;", "if (di >= 32) return;\nint t = int(L) - 1;")
    with pytest.raises(EmulatorError, match=r"reached by 32 of 40 threads"):
        mx.eval(mx.grad(lambda q: hk.ema_dechunk(values, q, chunk_index, seq, factory=broken).sum())(p))


# -- the on-device self test ----------------------------------------------------------------


def test_self_test_passes_for_the_shipped_kernels(factory):
    report = hk.self_test(mlx_kernels.pure_paths(), factory)
    assert set(report) == {"ssm_step", "conv_step", "ssd_scan", "ssd_scan backward", "ema_dechunk", "ema_dechunk backward"}
    assert all(problem is None for problem in report.values()), report


@needs_emulator
def test_self_test_reports_a_broken_kernel():
    broken = Mutated("hnet_ssd_chunk_scan", "y[xi] = acc + Dh * xv;", "y[xi] = acc;")  # drops the D skip term
    report = hk.self_test(mlx_kernels.pure_paths(), broken)
    assert "differs from the pure-MLX path" in report["ssd_scan"]
    assert report["ssm_step"] is None and report["ema_dechunk"] is None


@needs_emulator
def test_factory_selection_is_scoped_and_explicit_factory_wins():
    assert isinstance(hk.current_factory(), hk.MetalFactory)
    assert hk.is_available() == METAL
    explicit = hk.EmulatorFactory(orders=1)
    with hk.emulated() as outer:
        assert hk.current_factory() is outer and hk.is_available()
        with hk.use_factory(explicit):
            assert hk.current_factory() is explicit
        assert hk.current_factory() is outer
        assert hk.current_factory(explicit) is explicit
    assert isinstance(hk.current_factory(), hk.MetalFactory)


@needs_emulator
def test_mlx_dispatch_routes_use_kernels_on_to_the_active_factory():
    """hnet_mlx.kernels with mode="on" calls hnet_metal_kernels, which runs on the emulator here."""
    x, dt, A, B, C, D, seq, init = _ssd_inputs(1, 9, 2, 32, 16, 1, F32, False, False, False)
    with hk.emulated(orders=1) as fac:
        y, _ = mlx_kernels.ssd_scan(x, dt, A, B, C, 4, D, mode="on")
        mx.eval(y)
    assert "hnet_ssd_chunk_scan" in fac.kernel_names()
    close(y, ref.ssd_chunk_scan(x, dt, A, B, C, 4, D)[0], 2e-5, "y")
    if not METAL:  # auto never picks the kernels without Metal, emulator or not
        assert not mlx_kernels.use_fused("auto", "ssd_scan")
