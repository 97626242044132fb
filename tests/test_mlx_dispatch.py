"""hnet_mlx/kernels.py is the one dispatch point: `use_kernels` "off" runs pure MLX, "on" calls
hnet_metal_kernels.<name> with the contract signatures (here a recording stand-in that delegates
to the pure functions), "auto" picks pure MLX on a machine without Metal, and bad settings are
one-line errors."""

import types

import mlx.core as mx
import numpy as np
import pytest

from hnet_core import HNetError
from hnet_core.tokenizer import encode
from hnet_mlx import kernels, ssd

from conftest import TEXT, config_1stage, random_torch_model
from mlx_helpers import mlx_from_torch, np_


def recording_kernels(calls: list):
    """A stand-in hnet_metal_kernels: records each call's argument shapes, computes with the pure twin."""
    def wrap(name, fn):
        def kernel(*args):
            calls.append((name, [None if a is None else getattr(a, "shape", a) for a in args]))
            return fn(*args)
        return kernel

    return types.SimpleNamespace(
        ssd_scan=wrap("ssd_scan", ssd.ssd_chunk_scan),
        ssm_step=wrap("ssm_step", ssd.ssm_step),
        ema_dechunk=wrap("ema_dechunk", ssd.ema_dechunk),
        conv_step=wrap("conv_step", lambda *a: kernels.conv_step(*a, mode="off")),
    )


def _run(model):
    ids = mx.array([encode(TEXT[:40]), encode(TEXT[50:80]) + [0] * 10])
    mask = mx.array(np.arange(41)[None] < np.array([[41], [31]]))
    forward = model(ids, mask=mask).logits
    cache = model.allocate_inference_cache(batch_size=2, max_seqlen=45)
    model(ids, mask=mask, cache=cache)
    step = model.step(mx.array([[65], [66]]), cache).logits
    return np_(forward), np_(step)


def test_on_routes_every_kernel_through_hnet_metal_kernels(monkeypatch):
    model = mlx_from_torch(random_torch_model(config_1stage()))
    reference = _run(model)
    calls: list = []
    monkeypatch.setattr(kernels, "_metal", lambda: recording_kernels(calls))
    model.set_kernels("on")
    got = _run(model)
    assert {name for name, _ in calls} == {"ssd_scan", "ssm_step", "ema_dechunk", "conv_step"}
    ssd_args = next(a for n, a in calls if n == "ssd_scan")
    assert len(ssd_args) == 9 and ssd_args[5] == 8  # x, dt, A, B, C, chunk_size, D, seq_idx, initial_state
    for a, b in zip(reference, got):
        assert np.abs(a - b).max() <= 1e-6


def test_auto_uses_pure_mlx_without_metal():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    assert kernels.use_fused("auto", "ssd_scan") is False


def test_on_without_the_kernel_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(kernels, "_metal", lambda: None)
    with pytest.raises(HNetError, match="hnet_metal_kernels"):
        kernels.use_fused("on", "ssd_scan")


def test_unknown_kernel_mode_is_rejected():
    model = mlx_from_torch(random_torch_model(config_1stage()))
    with pytest.raises(HNetError, match="use_kernels"):
        model.set_kernels("fast")
    with pytest.raises(HNetError, match="use_kernels"):
        kernels.use_fused("yes", "ssm_step")


def test_auto_asks_the_measured_dispatch_of_the_kernel_package(monkeypatch):
    """On a Mac, "auto" runs a kernel only where hnet_metal_kernels.dispatch says so for this call."""
    asked = []

    class FakeMetal:
        def ssd_scan(self, *a):
            raise AssertionError("must not be called")

        dispatch = types.SimpleNamespace(prefer_kernel=lambda name, args, pure: asked.append((name, len(args))) or False)

    monkeypatch.setattr(kernels, "_metal", lambda: FakeMetal())
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    x = mx.zeros((1, 4, 2, 8))
    y, _ = kernels.ssd_scan(x, mx.zeros((1, 4, 2)), -mx.ones((2,)), mx.zeros((1, 4, 1, 16)), mx.zeros((1, 4, 1, 16)), 8,
                            mode="auto")
    assert asked == [("ssd_scan", 9)] and y.shape == x.shape


def _package(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(kernels, "METAL_PACKAGE", name)
    kernels._module.cache_clear()
    monkeypatch.setattr(kernels, "_IMPORT_ERRORS", {})


@pytest.mark.parametrize("body, cause", [
    ("raise RuntimeError('metallib version mismatch')", "RuntimeError: metallib version mismatch"),
    ("import hnet_a_dependency_that_is_not_installed", "No module named 'hnet_a_dependency_that_is_not_installed'"),
])
def test_a_kernel_package_that_fails_to_import_is_reported_and_on_raises_the_cause(tmp_path, monkeypatch, body, cause):
    _package(tmp_path, monkeypatch, "hnet_broken_kernels_pkg", body)
    try:
        with pytest.warns(RuntimeWarning, match="hnet_broken_kernels_pkg is installed but failed to import"):
            assert kernels.use_fused("auto", "ssd_scan") is False
        with pytest.raises(HNetError, match=f"failed to import: .*{cause}"):
            kernels.use_fused("on", "ssd_scan")
    finally:
        kernels._module.cache_clear()


def test_a_missing_kernel_package_is_silent_for_auto(monkeypatch, recwarn):
    monkeypatch.setattr(kernels, "METAL_PACKAGE", "hnet_no_such_kernel_package")
    kernels._module.cache_clear()
    try:
        assert kernels.use_fused("auto", "ssd_scan") is False
        with pytest.raises(HNetError, match="needs the hnet_no_such_kernel_package package"):
            kernels.use_fused("on", "ssd_scan")
    finally:
        kernels._module.cache_clear()
    assert not [w for w in recwarn if "failed to import" in str(w.message)]


def test_the_environment_sets_the_default_mode_and_set_kernels_wins(monkeypatch):
    monkeypatch.setenv("HNET_METAL_KERNELS", "off")
    model = mlx_from_torch(random_torch_model(config_1stage()))
    modes = {m.use_kernels for _, m in model.named_modules() if "use_kernels" in m.__dict__}
    assert modes == {"off"}
    model.set_kernels("auto")
    assert {m.use_kernels for _, m in model.named_modules() if "use_kernels" in m.__dict__} == {"auto"}
    monkeypatch.setenv("HNET_METAL_KERNELS", "fast")
    with pytest.raises(HNetError, match="HNET_METAL_KERNELS='fast'"):
        kernels.default_mode()
    monkeypatch.delenv("HNET_METAL_KERNELS")
    assert kernels.default_mode() == "auto"
