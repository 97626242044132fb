"""Measured dispatch for use_kernels="auto" (hnet_metal_kernels/dispatch.py), run on Linux with the
CPU emulator as the kernel factory and a fake timer that reports chosen times (the kernels and the
pure paths still run once per timing, so the synthetic inputs of each shape class are exercised):
the faster path is chosen, decisions are cached on disk and reused, a changed kernel source or MLX
version re-measures, a variant failing its correctness gate is never timed or used, and the whole
model in "auto" follows the decisions."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import hnet_metal_kernels as hk
from hnet_metal_kernels import dispatch
from hnet_metal_kernels.emulator import compiler_available
from hnet_mlx import kernels as mlx_kernels

from conftest import TEXT, config_1stage, random_torch_model
from mlx_helpers import mlx_from_torch, np_

pytestmark = pytest.mark.skipif(not compiler_available(), reason="the Metal emulator needs g++ (apt-get install g++)")

F32 = mx.float32


class FakeTimer:
    """Runs each timed function once (so it really works), reports `times[(kernel, path, pass)]`."""

    def __init__(self, times: dict):
        self.times = times
        self.calls: list[str] = []

    def __call__(self, label: str, run) -> float:
        run()
        self.calls.append(label)
        name, path, what = label.split()
        return self.times.get((name, path, what), self.times.get(path, 1.0))


def dispatcher(tmp_path, timer, factory=None, **kw) -> dispatch.Dispatcher:
    return dispatch.Dispatcher(pure=mlx_kernels.pure_paths(), factory=factory or hk.EmulatorFactory(orders=1, check_address_spaces=False),
                               timer=timer, path=tmp_path / "dispatch.json", **kw)


def step_args(b=2, dtype=F32):
    rng = np.random.default_rng(0)

    def f(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    return (f(b, 2, 8, 16), f(b, 2, 8).astype(dtype), f(b, 2).astype(dtype), f(2).astype(dtype), -mx.exp(f(2)),
            f(b, 1, 16).astype(dtype), f(b, 1, 16).astype(dtype), f(2).astype(dtype))


def scan_args(l):
    rng = np.random.default_rng(1)

    def f(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    return (f(1, l, 2, 8), mx.full((1, l, 2), 0.05), -mx.ones((2,)), f(1, l, 1, 16), f(1, l, 1, 16), 8, f(2), None, None)


def test_the_faster_path_is_chosen(tmp_path):
    fast_kernel = FakeTimer({"kernel": 1e-4, "pure": 2e-4})
    assert dispatcher(tmp_path / "a", fast_kernel).prefer_kernel("ssm_step", step_args()) is True
    assert fast_kernel.calls == ["ssm_step kernel forward", "ssm_step pure forward"]
    slow_kernel = FakeTimer({"kernel": 3e-4, "pure": 2e-4})
    assert dispatcher(tmp_path / "b", slow_kernel).prefer_kernel("ssm_step", step_args()) is False


def test_a_scan_kernel_must_win_forward_and_backward(tmp_path):
    """A call cannot tell whether a gradient follows: the kernel must not be slower for either."""
    wins_forward_only = FakeTimer({("ssd_scan", "kernel", "forward"): 1e-4, ("ssd_scan", "pure", "forward"): 2e-4,
                                   ("ssd_scan", "kernel", "backward"): 5e-4, ("ssd_scan", "pure", "backward"): 4e-4})
    d = dispatcher(tmp_path, wins_forward_only)
    assert d.prefer_kernel("ssd_scan", scan_args(20)) is False
    assert wins_forward_only.calls == ["ssd_scan kernel forward", "ssd_scan pure forward",
                                       "ssd_scan kernel backward", "ssd_scan pure backward"]


def test_decisions_are_cached_on_disk_and_reused(tmp_path):
    timer = FakeTimer({"kernel": 1e-4, "pure": 2e-4})
    first = dispatcher(tmp_path, timer)
    assert first.prefer_kernel("ssm_step", step_args()) is True
    assert first.prefer_kernel("ssm_step", step_args(b=2)) is True  # same class: no second measurement
    saved = json.loads((tmp_path / "dispatch.json").read_text())
    assert saved["identity"] == dispatch.identity(mlx_kernels.pure_paths().files)
    (key, decision), = saved["decisions"].items()
    assert key.startswith("ssm_step|b=2,") and decision == {"use_kernel": True, "kernel_s": [1e-4], "pure_s": [2e-4]}
    assert len(timer.calls) == 2
    again = FakeTimer({"kernel": 9.0, "pure": 1.0})  # would say "pure" if asked
    second = dispatcher(tmp_path, again)
    assert second.prefer_kernel("ssm_step", step_args()) is True
    assert again.calls == []
    # another shape class is measured and added next to the first
    assert second.prefer_kernel("ssm_step", step_args(b=5)) is False
    assert len(json.loads((tmp_path / "dispatch.json").read_text())["decisions"]) == 2


def test_lengths_share_a_class_per_power_of_two(tmp_path):
    timer = FakeTimer({"kernel": 1e-4, "pure": 2e-4})
    d = dispatcher(tmp_path, timer)
    d.prefer_kernel("ssd_scan", scan_args(20))
    d.prefer_kernel("ssd_scan", scan_args(29))  # both in the 32-byte bucket
    assert len(timer.calls) == 4 and len(d.decisions) == 1
    d.prefer_kernel("ssd_scan", scan_args(33))
    assert len(d.decisions) == 2 and "l=64" in sorted(d.decisions)[1]


@pytest.mark.parametrize("what", ["sources", "mlx"])
def test_a_changed_kernel_source_or_mlx_version_measures_again(tmp_path, monkeypatch, what):
    dispatcher(tmp_path, FakeTimer({"kernel": 1e-4, "pure": 2e-4})).prefer_kernel("ssm_step", step_args())
    if what == "sources":
        monkeypatch.setattr(dispatch, "sources_hash", lambda *files: "an-edited-kernel")
    else:
        monkeypatch.setattr(mx, "__version__", mx.__version__ + ".post1")
    timer = FakeTimer({"kernel": 3e-4, "pure": 2e-4})
    d = dispatcher(tmp_path, timer)
    assert d.prefer_kernel("ssm_step", step_args()) is False
    assert len(timer.calls) == 2
    saved = json.loads((tmp_path / "dispatch.json").read_text())
    assert saved["identity"] == dispatch.identity(mlx_kernels.pure_paths().files) and len(saved["decisions"]) == 1


def test_the_kernel_sources_hash_covers_every_kernel_body(monkeypatch, tmp_path):
    before = dispatch.sources_hash()
    body = tmp_path / "conv_step.metal"
    body.write_text((dispatch.HERE / "conv_step.metal").read_text() + "\n// edited\n")
    real = dispatch.HERE
    monkeypatch.setattr(dispatch, "HERE", tmp_path)
    for name in dispatch.KERNELS:
        if name != "conv_step":
            (tmp_path / f"{name}.metal").write_text((real / f"{name}.metal").read_text())
    for name in ("ssd.py", "step.py", "ema.py"):
        (tmp_path / name).write_text((real / name).read_text())
    assert dispatch.sources_hash() != before


def test_the_sources_hash_covers_the_pure_paths_files(tmp_path):
    pure = tmp_path / "ssd.py"
    pure.write_text("def ssm_step(): ...\n")
    before = dispatch.sources_hash((str(pure),))
    pure.write_text("def ssm_step(): return 1\n")
    assert dispatch.sources_hash((str(pure),)) != before != dispatch.sources_hash()


class PlantedBug(hk.EmulatorFactory):
    """The emulator with one kernel body edited."""

    def __init__(self, kernel: str, old: str, new: str):
        super().__init__(orders=1, check_address_spaces=False)
        self.kernel, self.old, self.new = kernel, old, new

    def metal_kernel(self, name, input_names, output_names, source, *args, **kwargs):
        if name == self.kernel:
            assert self.old in source
            source = source.replace(self.old, self.new)
        return super().metal_kernel(name, input_names, output_names, source, *args, **kwargs)


def test_a_variant_failing_its_check_is_never_timed_or_used(tmp_path):
    broken = PlantedBug("hnet_ssm_step", "y[size_t(bh) * P + pi] = acc + ", "y[size_t(bh) * P + pi] = 2.0f * acc + ")
    timer = FakeTimer({"kernel": 1e-6, "pure": 1.0})
    d = dispatcher(tmp_path, timer, factory=broken)
    with pytest.warns(RuntimeWarning, match=r"ssm_step\[.*differs from the pure-MLX path"):
        assert d.prefer_kernel("ssm_step", step_args()) is False
    assert d.prefer_kernel("ssm_step", step_args()) is False  # checked once, warned once
    assert timer.calls == [] and not (tmp_path / "dispatch.json").exists()


# A bug that only the bf16 instantiation has: 1 + 2^-8 survives a round trip through fp32 and fp16
# but rounds to 1 in bf16, so this adds 0 to the output except when OutT is bfloat16_t.
BF16_ONLY_BUG = ("out[size_t(bi) * C + ch] = static_cast<OutT>(acc / (1.0f + metal::exp(-acc)));",
                 "out[size_t(bi) * C + ch] = static_cast<OutT>(acc / (1.0f + metal::exp(-acc))"
                 " + 256.0f * (1.00390625f - static_cast<float>(static_cast<OutT>(1.00390625f))));")


def test_the_gate_checks_the_dtype_a_model_uses_and_catches_a_bf16_only_bug(tmp_path):
    broken = PlantedBug("hnet_conv_step", *BF16_ONLY_BUG)
    d = dispatcher(tmp_path, FakeTimer({"kernel": 1e-6, "pure": 1.0}), factory=broken)
    rng = np.random.default_rng(2)
    conv = [mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((2, 24, 4), (2, 24), (24, 4), (24,))]
    for dtype in (F32, mx.float16):  # an fp32-only gate (or an fp16 model) sees nothing wrong
        assert d.prefer_kernel("conv_step", tuple(a.astype(dtype) for a in conv)) is True
    with pytest.warns(RuntimeWarning, match=r"conv_step\[bfloat16"):
        assert d.prefer_kernel("conv_step", tuple(a.astype(mx.bfloat16) for a in conv)) is False
    # the package self-test and its CLI check every dtype too
    assert hk.self_test(mlx_kernels.pure_paths(), broken, mx.float32)["conv_step"] is None
    assert "differs" in hk.self_test(mlx_kernels.pure_paths(), broken, mx.bfloat16)["conv_step"]


def test_measuring_stops_after_the_time_budget(tmp_path):
    timer = FakeTimer({"kernel": 1e-4, "pure": 2e-4})
    d = dispatcher(tmp_path, timer, max_total_s=0.0)
    d.gates[dispatch.variant_of("ssm_step", step_args())] = {"ssm_step": None}  # already gated
    assert d.prefer_kernel("ssm_step", step_args()) is False
    assert timer.calls == [] and not d.decisions


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "c"))
    assert dispatch.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(dispatch.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dispatch.sys, "platform", "linux")
    assert dispatch.cache_dir() == tmp_path / "xdg" / "hnet_metal_kernels"
    monkeypatch.setattr(dispatch.sys, "platform", "darwin")
    assert dispatch.cache_dir().parts[-3:] == ("Library", "Caches", "hnet_metal_kernels")


@pytest.fixture
def fake_mac(monkeypatch):
    """hnet_mlx sees Metal and a GPU default device; kernels run on the emulator."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))


class FakeClock:
    """A clock that only moves when a timed run "takes" its fake duration (the real run happens once,
    so every path is still exercised)."""

    def __init__(self, durations: dict):
        self.now, self.durations, self.ran, self.timings = 0.0, durations, set(), []

    def __call__(self) -> float:
        return self.now

    def timer(self, budget_s=0.1, reps=5):
        wall = dispatch.wall_timer(budget_s=budget_s, reps=reps, clock=self)

        def timed(label, run):
            name, path, what = label.split()

            def fake_run():
                if label not in self.ran:
                    self.ran.add(label)
                    run()
                self.now += self.durations[(name, path, what)]

            self.timings.append(label)
            return wall(label, fake_run)

        return timed


# Mac-like durations (s): the decode kernels win, the scan kernel wins forward and backward, the
# dechunk kernel loses forward.
DURATIONS = {
    ("ssm_step", "kernel", "forward"): 1e-4, ("ssm_step", "pure", "forward"): 3e-4,
    ("conv_step", "kernel", "forward"): 1e-4, ("conv_step", "pure", "forward"): 2e-4,
    ("ssd_scan", "kernel", "forward"): 2e-3, ("ssd_scan", "pure", "forward"): 5e-3,
    ("ssd_scan", "kernel", "backward"): 6e-3, ("ssd_scan", "pure", "backward"): 9e-3,
    ("ema_dechunk", "kernel", "forward"): 2e-3, ("ema_dechunk", "pure", "forward"): 1e-3,
    ("ema_dechunk", "kernel", "backward"): 2e-3, ("ema_dechunk", "pure", "backward"): 3e-3,
}


def _generation(model) -> np.ndarray:
    """Prefill a prompt, then decode 6 bytes: the logits of every step (what generate() samples from)."""
    prompt = list(TEXT[:30].encode())
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=40)
    out = [model(mx.array([prompt]), cache=cache).logits[:, -1]]
    for b in TEXT[30:36].encode():
        out.append(model.step(mx.array([[b]]), cache).logits[:, -1])
    return np.stack([np_(o) for o in out])


def test_auto_generation_measures_once_then_runs_the_faster_paths(tmp_path, fake_mac):
    """First generation: every shape class it meets is gated and timed (the fake time this adds is
    bounded); later generations, in this process or the next, measure nothing."""
    model = mlx_from_torch(random_torch_model(config_1stage()))
    model.compile_step = False  # the emulator cannot be traced by mx.compile
    model.set_kernels("off")
    reference = _generation(model)
    model.set_kernels("auto")
    clock = FakeClock(DURATIONS)
    d = dispatcher(tmp_path, clock.timer())
    old = dispatch.set_default_dispatcher(d)
    try:
        with hk.emulated(orders=1) as used:
            first = _generation(model)
        added = clock.now
        with hk.emulated(orders=1):
            again = _generation(model)
        assert clock.now == added  # later use: cached decisions only
        dispatch.set_default_dispatcher(dispatcher(tmp_path, clock.timer()))  # "the next process"
        with hk.emulated(orders=1):
            _generation(model)
        assert clock.now == added
    finally:
        dispatch.set_default_dispatcher(old)
    assert np.abs(first - reference).max() <= 1e-4 and np.abs(again - reference).max() <= 1e-4
    assert {"hnet_ssd_chunk_scan", "hnet_ssm_step", "hnet_conv_step"} <= used.kernel_names()
    assert "hnet_ema_dechunk" not in used.kernel_names()
    classes = {k.split("|")[0] for k in d.decisions}
    assert classes == {"ssd_scan", "ema_dechunk", "ssm_step", "conv_step"}
    # each timing: warm-up + runs until 0.1 s has passed (at most 5) -> at most 0.1 s + 2 runs
    assert added <= sum(0.1 + 2 * DURATIONS[tuple(label.split())] for label in clock.timings)
    print(f"first generation: {len(d.decisions)} shape classes, {len(d.gates)} variants gated, "
          f"{len(clock.timings)} timings, {added * 1e3:.1f} ms of fake time added; later generations: 0")


def test_auto_on_linux_never_measures(tmp_path):
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    timer = FakeTimer({})
    old = dispatch.set_default_dispatcher(dispatcher(tmp_path, timer))
    try:
        assert mlx_kernels.use_fused("auto", "ssm_step", step_args()) is False
    finally:
        dispatch.set_default_dispatcher(old)
    assert timer.calls == []


def test_a_kernel_failing_while_timed_runs_the_pure_path(tmp_path):
    def timer(label, run):
        if "kernel" in label:
            raise RuntimeError("pipeline creation failed")
        return 1.0

    d = dispatcher(tmp_path, timer)
    with pytest.warns(RuntimeWarning, match="timing ssm_step.*pipeline creation failed"):
        assert d.prefer_kernel("ssm_step", step_args()) is False
    assert d.prefer_kernel("ssm_step", step_args()) is False
    assert not d.decisions and not (tmp_path / "dispatch.json").exists()
