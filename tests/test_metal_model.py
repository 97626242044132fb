"""The full MLX model with kernels forced on (use_kernels="on") reproduces the pure-MLX model: logits
and boundary decisions for padded batches and packed sequences, gradients of every parameter, and
generation (prefill + decode steps).

Each test runs on two backends:
  * "emulator" (everywhere with g++): the kernels run on the CPU emulator. It runs kernels eagerly
    on the host, so it cannot be traced by mx.compile: the decode step is run uncompiled
    (compile_step=False).
  * "metal" (Apple silicon only, skipped elsewhere): real `mx.fast.metal_kernel`, with the decode
    step mx.compile'd (compile_step=True, the default a Mac user gets), so the compiled step with
    kernels on is what the generation test checks there."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import hnet_metal_kernels as hk
from hnet_metal_kernels.emulator import compiler_available
import hnet_mlx
from hnet_core.tokenizer import encode
from hnet_core.engine import prompt_batch

from conftest import TEXT, random_torch_model
from mlx_helpers import mlx_from_torch, np_

METAL = bool(mx.metal.is_available())

ROWS = [TEXT[:61], TEXT[100:131], TEXT[140:147]]  # ragged: padding at every inner level too


@pytest.fixture(params=[
    "emulator",
    pytest.param("metal", marks=[pytest.mark.metal, pytest.mark.skipif(not METAL, reason="needs Apple silicon (Metal)")]),
])
def backend(request) -> str:
    if request.param == "emulator" and not compiler_available():
        pytest.skip("the Metal emulator needs g++ (apt-get install g++)")
    return request.param


@pytest.fixture
def model(small_config, backend):
    m = mlx_from_torch(random_torch_model(small_config))
    m.compile_step = backend == "metal"  # the emulator runs eagerly on the host; mx.compile cannot trace it
    m.backend = backend
    return m


def kernels(model, mode: str):
    """Set the mode; for "on", a block routing the kernels to this test's backend (a fresh factory,
    so that `kernel_names()` lists what this block built)."""
    model.set_kernels(mode)
    if mode != "on":
        return contextlib.nullcontext()
    if model.backend == "metal":
        return hk.use_factory(hk.MetalFactory())
    # one thread order: every kernel is checked in three orders by test_metal_kernels.py
    return hk.emulated(orders=1)


FORWARD_KERNELS = {"hnet_ssd_chunk_state", "hnet_ssd_state_passing", "hnet_ssd_chunk_scan", "hnet_ema_dechunk"}
BACKWARD_KERNELS = {"hnet_ssd_chunk_scan_bwd_c", "hnet_ssd_chunk_scan_bwd_x", "hnet_ssd_dlog_decay", "hnet_ema_dechunk_bwd"}


def _masked():
    seqs = [encode(r) for r in ROWS]
    L = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), np.int32)
    mask = np.zeros((len(seqs), L), bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return mx.array(ids), mx.array(mask)


def _outputs(model, mode):
    ids, mask = _masked()
    seqs = [encode(r) for r in ROWS]
    flat = mx.array([[b for s in seqs for b in s]])
    cu = mx.array(np.cumsum([0] + [len(s) for s in seqs]))
    with kernels(model, mode) as factory:
        masked = model(ids, mask=mask)
        packed = model(flat, cu_seqlens=cu)
        mx.eval(masked.logits, packed.logits)
    if mode == "on":  # the kernels really ran
        assert FORWARD_KERNELS <= factory.kernel_names()
    return masked, packed, np.array(mask)


def test_forward_with_kernels_on_reproduces_pure_mlx(model):
    masked_off, packed_off, valid = _outputs(model, "off")
    masked_on, packed_on, _ = _outputs(model, "on")
    assert np.abs(np_(masked_on.logits) - np_(masked_off.logits))[valid].max() <= 1e-4
    assert np.abs(np_(packed_on.logits) - np_(packed_off.logits)).max() <= 1e-4
    for out_on, out_off in ((masked_on, masked_off), (packed_on, packed_off)):
        for r_on, r_off in zip(out_on.routing, out_off.routing):
            assert np.array_equal(np_(r_on.boundary_mask), np_(r_off.boundary_mask))


def test_gradients_with_kernels_on_match_pure_mlx(model):
    ids, mask = _masked()
    ratios = [3.0] * model.config.num_stages

    def loss_fn(m):
        o = m(ids, mask=mask)
        return hnet_mlx.hnet_loss(o.logits, ids, o.routing, ratios, mask=mask)[0]

    results = {}
    for mode in ("off", "on"):
        with kernels(model, mode) as factory:
            loss, grads = nn.value_and_grad(model, loss_fn)(model)
            mx.eval(loss, grads)
        if mode == "on":
            assert FORWARD_KERNELS | BACKWARD_KERNELS <= factory.kernel_names()
        results[mode] = (loss.item(), dict(tree_flatten(grads)))
    np.testing.assert_allclose(results["on"][0], results["off"][0], rtol=1e-5)
    checked = 0
    largest = max(float(mx.abs(g).max().item()) for g in results["off"][1].values())
    for name, g_off in results["off"][1].items():
        g_on = results["on"][1][name]
        # a few SSM parameters get gradients ~1e-6 of the largest (float noise of everything upstream):
        # they are compared against a floor of 1e-3 x the largest gradient of the model
        scale = max(float(mx.abs(g_off).max().item()), 1e-3 * largest)
        err = float(mx.abs(g_on - g_off).max().item())
        # A_log's gradient is the sum the decay-gradient kernel computes with cancellation (ssd.py)
        tol = 1e-3 if name.endswith("A_log") else 1e-4
        assert err <= tol * scale, f"{name}: {err:.3g} > {tol} x {scale:.3g}"
        checked += 1
    mixers = [n for n in results["off"][1] if n.endswith("mixer.A_log")]
    assert mixers and checked > 20


def test_generation_with_kernels_on_is_unchanged(model):
    """On Metal the decode steps are mx.compile'd with the kernels traced in (compile_step=True)."""
    prompts = [TEXT[:23], TEXT[50:57]]
    texts = {}
    logits = {}
    for mode in ("off", "on"):
        with kernels(model, mode) as factory:
            texts[mode] = hnet_mlx.generate(model, prompts, max_tokens=12, temperature=0.0)
            cache = model.allocate_inference_cache(batch_size=2, max_seqlen=64)
            ids, mask = (mx.array(a) for a in prompt_batch(prompts, 0))
            out = model(ids, mask=mask, cache=cache)
            steps = [out.logits]
            for b in encode(" the", add_bos=False):
                steps.append(model.step(mx.array([[b], [b]]), cache).logits)
            logits[mode] = [np_(s) for s in steps]
        if mode == "on":
            assert {"hnet_ssm_step", "hnet_conv_step"} | FORWARD_KERNELS <= factory.kernel_names()
    assert texts["on"] == texts["off"]
    valid = np.array(prompt_batch(prompts, 0)[1])
    assert np.abs(logits["on"][0] - logits["off"][0])[valid].max() <= 1e-4
    for s_on, s_off in zip(logits["on"][1:], logits["off"][1:]):
        assert np.abs(s_on - s_off).max() <= 1e-4

