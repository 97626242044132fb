"""What the PyTorch training benchmarks (bench_cuda_train, gpu_train_check) share: a small 2-stage
config, a training text made of the repository's own files, a seeded model behind TorchBackend and
a timed run of steps. torch is imported inside the functions, so importing this module stays cheap."""

from __future__ import annotations

import glob
import os
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = {
    "arch_layout": ["m2", ["m2", ["T3"], "m2"], "m2"], "d_model": [128, 192, 256], "d_intermediate": [0, 0, 640],
    "ssm_cfg": {"chunk_size": 64, "d_conv": 4, "d_state": 32, "expand": 2},
    "attn_cfg": {"num_heads": [2, 3, 4], "rotary_emb_dim": [32, 32, 32], "window_size": [-1, -1, -1]},
}


def repo_text(min_bytes: int) -> bytes:
    """The repository's own .py and .md files, doubled until at least `min_bytes` long (nothing to download)."""
    parts = []
    for path in sorted(glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True)
                       + glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True)):
        if not any(skip in path for skip in ("/.venv/", "/.git/", "/runs/")):
            with open(path, "rb") as f:
                parts.append(f.read())
    text = b"\n".join(parts)
    while len(text) < min_bytes:
        text += text
    return text


def seeded_backend(config, device, train_config, seed: int = 0, **backend_options):
    """TorchBackend over a freshly initialised HNetForCausalLM(config) (official init after
    torch.manual_seed(seed)); backend_options go to TorchBackend (kernels, compile)."""
    import torch

    from hnet_torch import HNetForCausalLM
    from hnet_torch.train import TorchBackend

    torch.manual_seed(seed)
    model = HNetForCausalLM(config)
    model.init_weights()
    return TorchBackend(model, train_config, torch.device(device), **backend_options)


def run_timed(step: Callable[[], object], count: int, sync: Callable[[], None]) -> tuple[list, float]:
    """`count` calls of `step`: (their results, seconds from the first call to `sync()` after the last,
    so queued GPU work is counted)."""
    t = time.perf_counter()
    results = [step() for _ in range(count)]
    sync()
    return results, time.perf_counter() - t
