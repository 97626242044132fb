"""One command that says what works and how fast, for a bug report from Apple silicon.

    python -m hnet_metal_kernels.verify            # a table, then the same as JSON
    python -m hnet_metal_kernels.verify --json     # the JSON block only
    python -m hnet_metal_kernels.verify --quick    # smaller sizes (about a minute on a Mac)

Sections (each row of the table is one figure of the JSON):
  environment    chip, OS, MLX version, whether Metal / g++ / clang++ are here
  kernels        every kernel body: built and run by the checks below (Metal on a Mac, else the emulator)
  correctness    every kernel, forward and gradients, against the pure-MLX path, in the variants a
                 model uses at fp32, fp16 and bf16 (selftest.model_variants), at small sizes that
                 cover the edge cases and (not --quick) at hnet_2stage_XL's head sizes and chunk size
  planted bugs   kernels with a bug planted on purpose (a dropped skip term in the scan, a bf16-only
                 error in conv_step) must fail those checks: the checks have teeth on this machine
  kernel timing  (Mac) kernel vs pure MLX at hnet_2stage_XL's shapes: decode step (ssm_step,
                 conv_step), prefill (ssd_scan, ema_dechunk forward) and training (forward +
                 backward) at 1k and 8k bytes (--quick: 1k)
  model checks   (Mac) those the model package supplies with its pure paths (PurePaths.model_checks;
                 the MLX H-Net package's: a small model's mx.compile'd decode step with kernels on
                 against pure MLX, and a random-weight hnet_2stage_XL model's bytes/s with kernels
                 off, on and auto)
On Linux the correctness sections run through the CPU emulator; the sections marked (Mac) need
Metal and are reported as "not run". Exit status: 0 if every check that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time

import mlx.core as mx

from . import dispatch
from .factory import EmulatorFactory, KernelFactory, MetalFactory
from .reference import NoPurePaths, PurePaths, registered
from .selftest import DTYPES, Variant, check_variant, model_variants
from .sources import KERNELS

NOT_RUN = "not run"
NEEDS_MAC = "needs Apple silicon (Metal)"
XL = "hnet_2stage_XL"
RATIO = 3  # bytes per chunk at each routing stage (the XL models' targets)
SECTIONS = ("correctness", "planted_bugs", "kernel_timing")  # the kernel-level sections after "kernels"


def environment(pure: PurePaths) -> dict:
    return {
        "chip": dispatch.chip_name(), "os": dispatch.os_version(), "python": platform.python_version(),
        "mlx": mx.__version__, "metal": bool(mx.metal.is_available()), "default_device": str(mx.default_device()),
        "g++": shutil.which("g++") is not None, "clang++": shutil.which("clang++") is not None,
        "kernel_sources": dispatch.sources_hash(pure.files),
    }


# -- correctness ---------------------------------------------------------------------------------


def xl_dims() -> dict:
    """hnet_2stage_XL's per-head sizes (identical at every level) and chunk size."""
    from hnet_core.config import MAMBA_HEADDIM
    from hnet_core.official import official_config

    ssm = official_config(XL).ssm_cfg.at(0)
    return {"p": MAMBA_HEADDIM, "n": ssm["d_state"], "chunk_size": ssm["chunk_size"], "k": ssm["d_conv"]}


def correctness(factory: KernelFactory, pure: PurePaths, quick: bool) -> list[dict]:
    sizes = [("small", {})] + ([] if quick else [("XL heads", xl_dims())])
    rows = []
    for label, dims in sizes:
        for dname, dtype in DTYPES.items():
            for variant in model_variants(dtype, **dims):
                start = time.perf_counter()
                for check, problem in check_variant(variant, pure, factory).items():
                    rows.append({"check": check, "dtype": dname, "sizes": label, "variant": variant.describe(),
                                 "result": "ok" if problem is None else f"FAIL: {problem}"})
                rows[-1]["seconds"] = round(time.perf_counter() - start, 3)
    return rows


class _Planted:
    """`factory` with one kernel's body edited (a bug planted on purpose)."""

    def __init__(self, factory: KernelFactory, kernel: str, old: str, new: str):
        self.inner, self.kernel, self.old, self.new = factory, kernel, old, new
        self.name = f"{factory.name}+bug"

    def metal_kernel(self, name, input_names, output_names, source, *args, **kwargs):
        if name == self.kernel:
            source = source.replace(self.old, self.new)
        return self.inner.metal_kernel(name, input_names, output_names, source, *args, **kwargs)

    def available(self) -> bool:
        return self.inner.available()


PLANTED = [  # (what, kernel, old, new, variant dtype that must fail, dtype that must still pass)
    ("scan drops the D skip term", "hnet_ssd_chunk_scan", "y[xi] = acc + Dh * xv;", "y[xi] = acc;", "float32", None),
    ("conv_step wrong in bf16 only", "hnet_conv_step",
     "out[size_t(bi) * C + ch] = static_cast<OutT>(acc / (1.0f + metal::exp(-acc)));",
     "out[size_t(bi) * C + ch] = static_cast<OutT>(acc / (1.0f + metal::exp(-acc))"
     " + 256.0f * (1.00390625f - static_cast<float>(static_cast<OutT>(1.00390625f))));", "bfloat16", "float16"),
]


def planted_bugs(make_factory, pure: PurePaths) -> list[dict]:
    rows = []
    for what, kernel, old, new, failing, passing in PLANTED:
        name = "ssd_scan" if "scan" in kernel else "conv_step"
        verdicts = {}
        for dname in filter(None, (failing, passing)):
            variant = next(v for v in model_variants(DTYPES[dname]) if v.kernel == name)
            report = check_variant(variant, pure, _Planted(make_factory(), kernel, old, new))
            verdicts[dname] = report[name] is not None
        ok = verdicts[failing] and not (passing and verdicts[passing])
        rows.append({"bug": what, "kernel": kernel, "caught_in": failing, "clean_in": passing,
                     "result": "ok" if ok else f"FAIL: caught {verdicts}"})
    return rows


# -- timing ---------------------------------------------------------------------------------------


def xl_levels(seq_bytes: int) -> list[dict]:
    from hnet_core.config import MAMBA_HEADDIM
    from hnet_core.official import official_config

    config = official_config(XL)
    levels, length = [], seq_bytes
    for level, d_model in enumerate(config.d_model):
        ssm = config.ssm_cfg.at(level)
        d_inner = ssm["expand"] * d_model
        levels.append({"level": level, "length": length, "d_model": d_model, "h": d_inner // MAMBA_HEADDIM,
                       "p": MAMBA_HEADDIM, "n": ssm["d_state"], "chunk": ssm["chunk_size"], "k": ssm["d_conv"],
                       "c": d_inner + 2 * ssm["d_state"], "mamba": any(x.lower().startswith("m") for x in config.layers_at(level))})
        length = max(1, length // RATIO)
    return levels


def _fp32_variant(name: str, dims: tuple, with_seq: bool = False) -> Variant:
    f = "float32"
    if name == "ssm_step":
        return Variant(name, (f,) * 8, dims)
    if name == "conv_step":
        return Variant(name, (f,) * 4, dims)
    if name == "ssd_scan":
        return Variant(name, (f, f, f, f, f, "int", f, "int32" if with_seq else None, None), dims)
    return Variant(name, (f, f, "int32", "int32" if with_seq else None), dims)


def kernel_timing(pure: PurePaths, quick: bool, budget_s: float) -> list[dict]:
    timer = dispatch.wall_timer(budget_s=budget_s, reps=5)
    factory = MetalFactory()
    kernel_fns = {}
    rows = []

    def time_op(phase, name, sizes, variant, level):
        kernel, reference = kernel_fns.setdefault(name, dispatch._paths(name, factory, pure))
        args = dispatch._synthetic(name, sizes, variant)
        run = (lambda fn: dispatch._backward_run(name, fn, args)) if phase == "train" else (lambda fn: dispatch._forward_run(fn, args))
        k_s, p_s = timer(f"{name} kernel", run(kernel)), timer(f"{name} pure", run(reference))
        rows.append({"phase": phase, "op": name, "level": level, "shape": sizes, "kernel_ms": round(k_s * 1e3, 4),
                     "pure_ms": round(p_s * 1e3, 4), "speedup": round(p_s / k_s, 3) if k_s > 0 else None})

    for lv in xl_levels(1024):
        if lv["mamba"]:
            time_op("decode", "ssm_step", {"b": 1, "h": lv["h"], "g": 1, "p": lv["p"], "n": lv["n"]},
                    _fp32_variant("ssm_step", (lv["p"], lv["n"])), lv["level"])
            time_op("decode", "conv_step", {"b": 1, "c": lv["c"], "k": lv["k"]}, _fp32_variant("conv_step", (lv["k"],)),
                    lv["level"])
    for seq_bytes in (1024,) if quick else (1024, 8192):
        levels = xl_levels(seq_bytes)
        for phase in ("prefill", "train"):
            for lv in levels:
                if lv["mamba"]:
                    sizes = {"b": 1, "l": lv["length"], "h": lv["h"], "g": 1, "p": lv["p"], "n": lv["n"], "chunk": lv["chunk"]}
                    time_op(f"{phase} {seq_bytes}B", "ssd_scan", sizes,
                            _fp32_variant("ssd_scan", (lv["p"], lv["n"], lv["chunk"])), lv["level"])
            for s in range(len(levels) - 1):  # dechunk of stage s: level s+1's chunks onto level s's positions
                lv = levels[s]
                sizes = {"b": 1, "l": lv["length"], "m": max(1, lv["length"] // RATIO), "d": levels[s + 1]["d_model"]}
                time_op(f"{phase} {seq_bytes}B", "ema_dechunk", sizes, _fp32_variant("ema_dechunk", (sizes["d"],)), s)
    return rows


# -- report -----------------------------------------------------------------------------------------


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # a section that crashes is a finding, not the end of the report
        return {"status": f"FAIL: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}


def report(pure: PurePaths, quick: bool = False, emulate: bool | None = None, budget_s: float = 0.3) -> dict:
    """Every section (see the module docstring); `pure`: the reference paths and the model checks."""
    metal = bool(mx.metal.is_available())
    use_emulator = (not metal) if emulate is None else emulate
    env = environment(pure)
    out: dict = {"environment": env, "quick": quick, "ran_on": "emulator" if use_emulator else "metal"}
    if use_emulator:
        from .emulator import compiler_available

        if not compiler_available():
            out["kernels"] = {k: {"status": NOT_RUN, "why": "no Metal and no g++ for the emulator"} for k in KERNELS}
            for key in ("correctness", "planted_bugs"):
                out[key] = {"status": NOT_RUN, "why": "no Metal and no g++ for the emulator"}
        # one thread order: the emulator tests run all three; clang's check runs when installed
        make = lambda: EmulatorFactory(orders=1)  # noqa: E731
    else:
        make = MetalFactory
    if "correctness" not in out:
        factory = make()
        out["correctness"] = _guard(correctness, factory, pure, quick)
        built = factory.kernel_names()
        failing = {r["variant"] for r in out["correctness"] if isinstance(r, dict) and r.get("result", "ok") != "ok"} \
            if isinstance(out["correctness"], list) else set()
        out["kernels"] = {k: {"status": "ok" if f"hnet_{k}" in built else "not built",
                              "on": out["ran_on"]} for k in KERNELS}
        if failing:
            out["kernels_note"] = "some variants failed: see correctness"
        out["planted_bugs"] = _guard(planted_bugs, make, pure)
    mac_only = {"kernel_timing": (kernel_timing, pure, quick, budget_s)}
    mac_only.update({key: (check, quick) for key, check in pure.model_checks})
    for key, (fn, *args) in mac_only.items():
        out[key] = _guard(fn, *args) if metal else {"status": NOT_RUN, "why": NEEDS_MAC}
    out["passed"] = _passed(out)
    return out


def _passed(out: dict) -> bool:
    def bad(x) -> bool:
        if isinstance(x, dict):
            return any(bad(v) for v in x.values())
        if isinstance(x, list):
            return any(bad(v) for v in x)
        return isinstance(x, str) and x.startswith("FAIL")

    return not bad({k: v for k, v in out.items() if k != "passed"})


def table(out: dict) -> str:
    lines = ["hnet_metal_kernels verify: " + ", ".join(f"{k} {v}" for k, v in out["environment"].items()),
             f"checks ran on: {out['ran_on']}{' (--quick)' if out['quick'] else ''}", ""]

    def section(title: str, value) -> None:
        lines.append(f"== {title}")
        if isinstance(value, dict) and "status" in value:
            lines.append(f"   {value['status']}" + (f": {value['why']}" if "why" in value else ""))
        elif isinstance(value, dict):
            for k, v in value.items():
                lines.append(f"   {k:24} {v['status'] if isinstance(v, dict) else v}")
        elif isinstance(value, list):
            for row in value:
                lines.append("   " + "  ".join(f"{k}={v}" for k, v in row.items()))
        lines.append("")

    kernels = out.get("kernels", {})
    section("kernels (built and run by the checks)", kernels)
    corr = out.get("correctness")
    if isinstance(corr, list):
        by = {}
        for r in corr:
            key = (r["check"], r["dtype"], r["sizes"])
            by.setdefault(key, []).append(r["result"])
        lines.append("== correctness vs pure MLX (forward and gradients; every variant a model uses)")
        for (check, dtype, sizes), results in by.items():
            fails = [r for r in results if r != "ok"]
            lines.append(f"   {check:22} {dtype:9} {sizes:9} {'ok' if not fails else fails[0]}"
                         + (f"  ({len(results)} variants)" if len(results) > 1 else ""))
        lines.append("")
    else:
        section("correctness", corr)
    section("planted bugs (must be caught)", out.get("planted_bugs"))
    section("kernel vs pure MLX at hnet_2stage_XL shapes (ms)", out.get("kernel_timing"))
    known = set(SECTIONS) | {"environment", "quick", "ran_on", "kernels", "kernels_note", "passed"}
    for key in [k for k in out if k not in known]:  # the model package's checks (PurePaths.model_checks)
        section(key.replace("_", " ") + " (model check)", out[key])
    lines.append("RESULT: " + ("every check that ran passed" if out["passed"] else "FAILURES above"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the JSON block only")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: small-size checks, 1k bytes, a short decode")
    ap.add_argument("--emulate", action="store_true", help="run the correctness checks on the CPU emulator even on a Mac")
    args = ap.parse_args(argv)
    try:
        pure = registered()
    except NoPurePaths as e:
        print(e)
        return 2
    out = report(pure, quick=args.quick, emulate=True if args.emulate else None)
    if not args.json:
        print(table(out))
        print("\nJSON (paste this into a bug report):")
    print(json.dumps(out, indent=1))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
