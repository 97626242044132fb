"""hnet_torch's kernel dispatch on CPU: named paths mean exactly what they say, optional packages
that fail to import are reported (not mistaken for "not installed"), and FlexAttention's
block-sparse mask computes what the masked-SDPA reference computes (causal, sliding window,
same document in packed batches). torch 2.13 runs FlexAttention forward-only on CPU; its
gradients are checked on a GPU (tests/test_cuda_kernels.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from hnet_core.errors import HNetError
from hnet_torch import kernels


@pytest.fixture
def fresh_probes(monkeypatch):
    """Forget which optional packages were imported, so a test can plant its own."""
    monkeypatch.setattr(kernels, "_PROBED", {})
    return monkeypatch


def write_package(root, name: str, body: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)


# -- the kernel spec -------------------------------------------------------------------------


def test_kernel_specs_name_each_path():
    assert kernels.parse_plan("off") == kernels.KernelPlan("pure", "pure", "sdpa")
    assert kernels.parse_plan("on") == kernels.KernelPlan("mamba_ssm", "causal_conv1d", "flash_attn")
    assert kernels.parse_plan("auto") == kernels.KernelPlan()
    assert kernels.parse_plan("scan=compiled, attention=flex") == kernels.KernelPlan("compiled", "auto", "flex")
    assert kernels.parse_plan("off", attention="flex") == kernels.KernelPlan("pure", "pure", "flex")
    for bad in ("fast", "scan=triton", "attn=flex", "attention=flash"):
        with pytest.raises(HNetError):
            kernels.parse_plan(bad)


def test_model_set_kernels_reaches_every_mixer_and_the_dechunk_layer():
    from conftest import config_2stage, random_torch_model

    model = random_torch_model(config_2stage())
    model.set_kernels("off", scan="compiled")
    plans = {m.use_kernels for m in model.modules() if hasattr(m, "use_kernels")}
    assert plans == {kernels.KernelPlan("compiled", "pure", "sdpa")}
    with pytest.raises(HNetError, match="attention must be one of"):
        model.set_kernels(attention="fused")


# -- "on" and named paths never fall back silently -------------------------------------------


def test_on_raises_on_cpu_for_every_path_including_the_decode_steps():
    x = torch.randn(2, 12, 2, 8)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    with pytest.raises(HNetError, match="scan=mamba_ssm cannot run"):
        kernels.ssd_scan(x, torch.rand(2, 12, 2), -torch.rand(2), torch.randn(2, 12, 1, 4), torch.randn(2, 12, 1, 4), 8,
                         torch.ones(2), mode="on")
    with pytest.raises(HNetError, match="scan=mamba_ssm cannot run"):
        kernels.ssm_step(torch.zeros(2, 2, 8, 4), x[:, 0], torch.randn(2, 2), torch.zeros(2), -torch.rand(2),
                         torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.ones(2), mode="on")
    with pytest.raises(HNetError, match="conv=causal_conv1d cannot run"):
        kernels.causal_conv1d_silu(torch.randn(2, 12, 6), weight, bias, mode="on")
    # The old dispatch ignored the mode in the conv decode step: "on" ran the pure path silently.
    with pytest.raises(HNetError, match="conv=causal_conv1d cannot run"):
        kernels.conv_step(torch.zeros(2, 6, 4), torch.randn(2, 6), weight, bias, mode="on")
    with pytest.raises(HNetError, match="attention=flash_attn cannot run"):
        kernels.attention(x, x, x, -1, mode="on")


def test_named_flash_attn_refuses_fp32_instead_of_using_sdpa(fresh_probes, tmp_path):
    """The old dispatch ran SDPA for fp32 under "on" even with flash-attn installed on CUDA."""
    write_package(tmp_path, "flash_attn", "def flash_attn_func(*a, **k):\n    raise AssertionError('must not run')\n")
    fresh_probes.syspath_prepend(str(tmp_path))
    fresh_probes.setattr(kernels, "_is_cuda", lambda x: True)  # pretend: a CUDA tensor
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(HNetError, match="flash_attn runs fp16/bf16 only"):
        kernels.attention(q, q, q, -1, mode="on")
    # "auto" on CUDA: flash-attn where it applies, FlexAttention otherwise.
    assert kernels.choose("attention", "auto", q.bfloat16()) == "flash_attn"
    assert kernels.choose("attention", "auto", q) == "flex"


def test_auto_uses_the_reference_paths_on_cpu_and_logs_its_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_ANNOUNCED", set())
    x = torch.randn(1, 8, 2, 16, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="hnet_torch.kernels"):
        assert kernels.choose("attention", "auto", x, needs_grad=True) == "sdpa"
        assert kernels.choose("attention", "auto", x, needs_grad=True) == "sdpa"
        assert kernels.choose("scan", "auto", x) == "pure"
        assert kernels.choose("conv", "auto", x) == "pure"
    said = [r.getMessage() for r in caplog.records]
    assert said.count("kernels: attention uses sdpa on cpu") == 1
    assert "kernels: scan uses pure on cpu" in said


def test_flex_on_cpu_refuses_a_backward_pass_with_a_clear_error():
    q = torch.randn(1, 8, 2, 16, requires_grad=True)
    with pytest.raises(HNetError, match="no backward pass on CPU"):
        kernels.attention(q, q, q, -1, mode="scan=pure,attention=flex")


# -- optional packages that fail to import -----------------------------------------------------


def test_missing_package_is_quietly_absent_but_a_broken_one_is_reported_once(fresh_probes, tmp_path, caplog):
    write_package(tmp_path, "hnet_broken_pkg", "raise RuntimeError('undefined symbol: cudaLaunchKernelExC')\n")
    write_package(tmp_path, "hnet_needs_dep_pkg", "import hnet_absent_dependency_xyz\n")
    fresh_probes.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="hnet_torch.kernels"):
        assert kernels.probe("hnet_absent_package_xyz") == (None, None)
        module, why = kernels.probe("hnet_broken_pkg")
        assert module is None and "RuntimeError: undefined symbol: cudaLaunchKernelExC" in why
        kernels.probe("hnet_broken_pkg")
        module, why = kernels.probe("hnet_needs_dep_pkg")
        assert module is None and "hnet_absent_dependency_xyz" in why  # a broken install, not "not installed"
        assert kernels.probe("hnet_absent_package_xyz.sub") == (None, None)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "undefined symbol" in warned[0] and "hnet_absent_dependency_xyz" in warned[1]


def test_a_requested_path_fails_with_the_real_import_error(fresh_probes, tmp_path):
    write_package(tmp_path, "causal_conv1d", "raise ImportError('libc10_cuda.so: cannot open shared object file')\n")
    fresh_probes.syspath_prepend(str(tmp_path))
    fresh_probes.setattr(kernels, "_is_cuda", lambda x: True)
    x = torch.randn(1, 8, 6)
    with pytest.raises(HNetError, match="conv=causal_conv1d cannot run: importing causal_conv1d failed: ImportError: "
                                        "libc10_cuda.so"):
        kernels.choose("conv", "causal_conv1d", x)
    assert kernels.choose("conv", "auto", x) == "pure"  # "auto" falls back, after the one warning


# -- FlexAttention == masked SDPA --------------------------------------------------------------


def qkv(b: int, l: int, h: int = 2, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, l, h, d, generator=g) for _ in range(3)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [4, 37, 500, -1], ids=["w4", "w37", "w_longer_than_seq", "global"])
def test_flex_mask_equals_sdpa_reference(window):
    q, k, v = qkv(2, 150, seed=window)
    ref = kernels.sdpa_attention(q, k, v, window)
    out = kernels.flex_attention(q, k, v, window, fused=False)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [5, -1])
def test_flex_packed_documents_never_see_each_other(window):
    lengths = [70, 1, 129, 60]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]  # (1, 260)
    q, k, v = qkv(1, 260, seed=3)
    ref = kernels.sdpa_attention(q, k, v, window, seq_idx=seq_idx)
    out = kernels.flex_attention(q, k, v, window, seq_idx=seq_idx, fused=False)
    assert (out - ref).abs().max() <= 1e-5
    # Changing every key and value of the other documents leaves each document's outputs unchanged.
    for doc in range(len(lengths)):
        other = (seq_idx != doc)[..., None, None]
        k2 = torch.where(other, torch.randn_like(k) * 5, k)
        v2 = torch.where(other, torch.randn_like(v) * 5, v)
        out2 = kernels.flex_attention(q, k2, v2, window, seq_idx=seq_idx, fused=False)
        mine = (seq_idx == doc)[0]
        assert torch.equal(out2[:, mine], out[:, mine])


def test_train_cli_checks_the_kernel_spec_and_a_named_path_fails_with_its_reason(tmp_path):
    from click.testing import CliRunner

    from conftest import tiny_run
    from hnet_torch.train import train_command

    cfg, data, _ = tiny_run(tmp_path)
    base = ["--config", cfg, "--data", data, "--steps", "1", "--batch-size", "2", "--seq-len", "32"]
    result = CliRunner().invoke(train_command, base + ["--out", str(tmp_path / "a"), "--kernels", "attention=fast"])
    assert isinstance(result.exception, HNetError) and "attention must be one of" in str(result.exception)
    result = CliRunner().invoke(train_command, base + ["--out", str(tmp_path / "b"), "--kernels", "attention=flex"])
    assert isinstance(result.exception, HNetError) and "no backward pass on CPU" in str(result.exception)
