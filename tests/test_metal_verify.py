"""`python -m hnet_metal_kernels.verify --json --quick`: the report a Mac user pastes into a bug
report. On Linux its correctness parts run through the CPU emulator and the parts that need Metal
are marked "not run"; the structure is the same everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from hnet_metal_kernels.emulator import compiler_available
from hnet_metal_kernels.selftest import CHECKS, DTYPES
from hnet_metal_kernels.sources import KERNELS

pytestmark = pytest.mark.skipif(not compiler_available(), reason="the Metal emulator needs g++ (apt-get install g++)")

MAC_ONLY = ("compiled_step", "kernel_timing", "model_timing")


def test_verify_json_quick_reports_every_kernel_and_marks_what_needs_a_mac():
    proc = subprocess.run([sys.executable, "-m", "hnet_metal_kernels.verify", "--json", "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    env = out["environment"]
    for key in ("chip", "os", "mlx", "metal", "kernel_sources"):
        assert key in env
    assert env["mlx"] == mx.__version__
    metal = bool(mx.metal.is_available())
    assert out["ran_on"] == ("metal" if metal else "emulator")
    # every kernel body was built and launched by the checks
    assert set(out["kernels"]) == set(KERNELS)
    assert all(k["status"] == "ok" for k in out["kernels"].values()), out["kernels"]
    # every check, forward and backward, at every dtype a model can use
    seen = {(r["check"], r["dtype"]) for r in out["correctness"]}
    assert seen == {(c, d) for c in CHECKS for d in DTYPES}
    assert all(r["result"] == "ok" for r in out["correctness"]), [r for r in out["correctness"] if r["result"] != "ok"]
    assert len(out["planted_bugs"]) == 2 and all(r["result"] == "ok" for r in out["planted_bugs"])
    for key in MAC_ONLY:
        if metal:
            assert "status" not in out[key] or not str(out[key]["status"]).startswith("FAIL")
        else:
            assert out[key] == {"status": "not run", "why": "needs Apple silicon (Metal)"}
    assert out["passed"] is True


def test_verify_table_says_which_parts_need_a_mac():
    from hnet_metal_kernels import verify

    out = {"environment": {"chip": "x"}, "ran_on": "emulator", "quick": True,
           "kernels": {k: {"status": "ok"} for k in KERNELS},
           "correctness": [{"check": "ssm_step", "dtype": "float32", "sizes": "small", "result": "FAIL: differs"}],
           "planted_bugs": [], **{k: {"status": "not run", "why": "needs Apple silicon (Metal)"} for k in MAC_ONLY}}
    out["passed"] = verify._passed(out)
    text = verify.table(out)
    assert out["passed"] is False and "RESULT: FAILURES above" in text
    assert text.count("not run: needs Apple silicon (Metal)") == len(MAC_ONLY)


def test_the_mac_only_sections_run_with_stand_ins_for_metal(monkeypatch):
    """The parts of verify that need Metal, run here with stand-ins so that their code is exercised:
    kernels "on" routed to the pure paths (compiled step, model timing on a small config) and the
    kernel timing on the emulator at tiny shapes."""
    import types

    import hnet_metal_kernels as hk
    from hnet_core.config import HNetConfig
    from hnet_metal_kernels import verify
    from hnet_mlx import kernel_checks, kernels, ssd

    stand_in = types.SimpleNamespace(
        ssd_scan=ssd.ssd_chunk_scan, ssm_step=ssd.ssm_step, ema_dechunk=ssd.ema_dechunk,
        conv_step=lambda *a: kernels.conv_step(*a, mode="off"))
    monkeypatch.setattr(kernels, "_metal", lambda: stand_in)
    step = kernel_checks.compiled_step()
    assert step["result"] == "ok" and step["max_abs_logit_diff"] == 0.0

    import hnet_core.official as official

    monkeypatch.setattr(official, "official_config", lambda name: HNetConfig.from_dict(kernel_checks.SMALL_CONFIG))
    rows = kernel_checks.model_timing(quick=True)
    assert [r["kernels"] for r in rows] == ["off", "on", "auto"]
    assert all(r["prefill_bytes_per_s"] > 0 and r["decode_bytes_per_s"] > 0 for r in rows)
    assert all(r["max_abs_logit_diff_vs_off"] == 0.0 for r in rows)

    tiny = [{"level": 0, "length": 24, "d_model": 32, "h": 2, "p": 8, "n": 16, "chunk": 8, "k": 4, "c": 48, "mamba": True},
            {"level": 1, "length": 8, "d_model": 48, "h": 2, "p": 8, "n": 16, "chunk": 8, "k": 4, "c": 48, "mamba": True}]
    monkeypatch.setattr(verify, "xl_levels", lambda seq_bytes: tiny)
    monkeypatch.setattr(verify, "MetalFactory", lambda: hk.EmulatorFactory(orders=1, check_address_spaces=False))
    timing = verify.kernel_timing(kernels.pure_paths(), quick=True, budget_s=0.0)
    assert {(r["phase"], r["op"]) for r in timing} == {
        ("decode", "ssm_step"), ("decode", "conv_step"), ("prefill 1024B", "ssd_scan"), ("prefill 1024B", "ema_dechunk"),
        ("train 1024B", "ssd_scan"), ("train 1024B", "ema_dechunk")}
    assert all(r["kernel_ms"] > 0 and r["pure_ms"] > 0 for r in timing)


def test_the_kernel_package_imports_nothing_of_the_model_package():
    """One direction: hnet_mlx uses hnet_metal_kernels, never the reverse (the model passes its pure
    paths in); importing every module of the kernel package leaves hnet_mlx unimported."""
    code = ("import sys, hnet_metal_kernels, hnet_metal_kernels.verify, hnet_metal_kernels.selftest, "
            "hnet_metal_kernels.dispatch, hnet_metal_kernels.reference; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'hnet_mlx'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
