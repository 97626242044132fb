"""Shared test helpers: the official fixture's location and small configs of our own.

The configs below are the internal-consistency cases for every backend: 1, 2 and 3 stages,
Mamba and attention blocks with and without MLPs, stages wider than their parent (pad_dimension)
and stages of equal width, and tiny SSD chunks so multi-chunk state passing runs.
"""

from __future__ import annotations

import contextlib
import os

# The default run is two pytest-xdist workers on 2 cores: each worker, and every process a test starts
# (the docs examples, CLI runs), computes on one thread. With two threads each, a torch prefill waits
# for a core the other worker holds (a 1.9 s docs example took 14.6 s in the full run). Tests of the
# thread policy set their counts themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from hnet_core.config import HNetConfig  # noqa: E402

try:  # hnet_mlx first, so it loads OpenBLAS before any test file imports mlx (hnet_mlx/blas.py)
    import hnet_mlx  # noqa: F401
except ImportError:  # MLX not installed: the MLX tests skip themselves
    pass

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "official", "1stage_tiny")

OFFICIAL_ONNX_MAX_SEQLEN = 400  # max_seqlen of the official fixture's shared ONNX export

SMALL_SSM = {"chunk_size": 8, "d_conv": 4, "d_state": 16, "expand": 2}


def config_1stage() -> HNetConfig:
    return HNetConfig.from_dict({
        "arch_layout": ["m1t1", ["T1m1"], "M1"], "d_model": [64, 96], "d_intermediate": [128, 192],
        "ssm_cfg": SMALL_SSM,
        "attn_cfg": {"num_heads": [2, 4], "rotary_emb_dim": [8, 12], "window_size": [6, -1]},
    })


def config_2stage() -> HNetConfig:
    return HNetConfig.from_dict({
        "arch_layout": ["m1", ["T1m1", ["t1M1"], "m1T1"], "m1"], "d_model": [32, 32, 64],
        "d_intermediate": [0, 64, 128], "ssm_cfg": SMALL_SSM,
        "attn_cfg": {"num_heads": [2, 2, 4], "rotary_emb_dim": [8, 8, 16], "window_size": [5, 3, -1]},
    })


def config_3stage() -> HNetConfig:
    return HNetConfig.from_dict({
        "arch_layout": ["m1", ["m1", ["t1", ["T1"], "t1"], "m1"], "m1"], "d_model": [32, 64, 64, 96],
        "d_intermediate": [0, 0, 0, 128], "ssm_cfg": SMALL_SSM,
        "attn_cfg": {"num_heads": [2, 2, 4, 4], "rotary_emb_dim": [8, 8, 8, 8], "window_size": [-1, -1, 4, -1]},
    })


SMALL_CONFIGS = {"1stage": config_1stage, "2stage": config_2stage, "3stage": config_3stage}


@pytest.fixture
def one_torch_thread():
    """Tiny torch ops are dominated by thread wake-ups; on a shared 2-core machine one thread is faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OFFICIAL_ONNX_UMASK = 0o027


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """(directory, done) for an artefact shared by the whole run: under pytest-xdist (-n 2 by default)
    every worker would build its own copy of a session fixture, so the workers share one directory of the
    run, and a file lock lets the first build it while another waits for it; `done` is False until built.
    The caller builds into `directory` when not done and returns; the lock is released afterwards."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above each worker's own
    directory = base / "shared" / name
    directory.parent.mkdir(exist_ok=True)
    marker = base / "shared" / (name + ".done")
    with open(base / "shared" / (name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield str(directory), marker.exists()
        marker.touch()


@pytest.fixture(scope="session")
def official_onnx_export(tmp_path_factory) -> str:
    """The official fixture exported once through `hnet export onnx` (with step_cond.onnx), shared by the
    ONNX runtime tests and the JavaScript runtime tests. Read-only: tests that break it copy it first."""
    from click.testing import CliRunner

    from hnet_core.cli import main as hnet_main

    with built_once(tmp_path_factory, "official_onnx") as (out, done):
        if done:
            return out
        before = os.umask(OFFICIAL_ONNX_UMASK)  # test_onnx_fixture checks the written files' permissions against it
        try:
            result = CliRunner().invoke(hnet_main, [
                "export", "onnx", "--model", os.path.join(FIXTURE_DIR, "model.pt"), "--config",
                os.path.join(FIXTURE_DIR, "config.json"), "--out", out, "--max-seqlen", str(OFFICIAL_ONNX_MAX_SEQLEN),
                "--batch-variants", "--jobs", "1",  # pytest-xdist keeps both cores busy already: no tracing workers
            ])
        finally:
            os.umask(before)
        assert result.exit_code == 0, result.output
        return out


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """export(config name, **export_model options) -> (torch model, export directory): the random model
    of `random_torch_model(config, seed=3)`, exported once per session for each set of options, so
    test modules that need the same export share it (an export takes most of a minute)."""
    import hashlib
    import inspect

    from hnet_export.exporter import export_model

    cache: dict = {}
    defaults = {k: p.default for k, p in inspect.signature(export_model).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def get(name: str, **options):
        # Options spelled out at their default value name the same export as options left out.
        key = (name, tuple(sorted({**defaults, **options}.items())))
        if key not in cache:
            model = random_torch_model(SMALL_CONFIGS[name](), seed=3)  # seeded: every worker gets the same
            with built_once(tmp_path_factory, "onnx_" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]) as (out, done):
                if not done:
                    export_model(model, out, **{"jobs": 1, **options})  # one process: xdist fills the cores
            cache[key] = (model, out)
        return cache[key]

    return get


JS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export", "js")


@pytest.fixture(scope="session")
def js_packages() -> str:
    """export/js with its locked npm packages installed (`npm ci` once, when node_modules lacks them), so
    one `python -m pytest` also runs the JavaScript tests on a fresh clone. Skips, saying why, where node
    or npm is missing. Under pytest-xdist a file lock keeps two workers from running npm ci at once."""
    import fcntl
    import shutil
    import subprocess

    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the JavaScript runtime tests (export/js) need Node.js 18+")
    with open(os.path.join(JS_DIR, "package-lock.json")) as lock:  # tracked, so always there to lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "onnxruntime-node")):
            # onnxruntime-node's install script would download CUDA binaries; its CPU ones ship in the package.
            run = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS_DIR,
                                 env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}, capture_output=True,
                                 text=True, timeout=600)
            assert run.returncode == 0, f"npm ci in export/js failed:\n{run.stdout}\n{run.stderr}"
    return JS_DIR


@pytest.fixture(params=sorted(SMALL_CONFIGS))
def small_config(request) -> HNetConfig:
    return SMALL_CONFIGS[request.param]()


TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the top, he could "
    "see the fishing boats returning to the harbor, their lanterns flickering like small stars on the dark water."
)


def random_torch_model(config: HNetConfig, seed: int = 0, routing_noise: float = 0.3):
    """A torch HNetForCausalLM with the official init plus noise on every parameter, so routing makes
    non-trivial decisions (identity q/k alone would mark almost nothing) and zero-init parts matter."""
    import torch

    from hnet_torch import HNetForCausalLM

    torch.manual_seed(seed)
    model = HNetForCausalLM(config)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = routing_noise if ("q_proj" in name or "k_proj" in name) else 0.02
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def padded_batch(seqs: list[list[int]], pad: int = 0):
    """Right-padded (B, L) int64 ids and bool mask from lists of bytes."""
    import torch

    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


def tiny_run(tmp_path, config_fn=config_1stage, text=TEXT, **settings):
    """(config path, data path, TrainConfig) for a short training run of a small config on TEXT."""
    from hnet_core.train_config import TrainConfig

    cfg_path = tmp_path / "config.json"
    config_fn().to_json(cfg_path)
    data = tmp_path / "text.txt"
    data.write_text(text)
    base = dict(steps=10, batch_size=4, seq_len=64, lr=3e-3, warmup=5, val_fraction=0.0, log_every=1,
                eval_every=10**6, save_every=10**6)
    base.update(settings)
    return str(cfg_path), str(data), TrainConfig(**base)


def wrong_modes(root, umask: int) -> list[str]:
    """'path mode' for each path under `root` (itself included) whose permissions are not the ones a
    plain open()/mkdir gives under `umask` (0666/0777 less the umask)."""
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    bad = []
    for path in [str(root)] + [os.path.join(r, n) for r, ds, fs in os.walk(root) for n in ds + fs]:
        mode = os.stat(path).st_mode & 0o777
        if mode != (want_dir if os.path.isdir(path) else want_file):
            bad.append(f"{os.path.relpath(path, root)} {oct(mode)}")
    return bad


def greedy_bytes(generator) -> list[list[int]]:
    """The bytes each sample generated, from any backend's stream_generate steps (None = sample finished)."""
    rows: list[list[int]] = []
    for step in generator:
        rows = rows or [[] for _ in step.bytes]
        for b, byte in enumerate(step.bytes):
            if byte is not None:
                rows[b].append(byte)
    return rows
