"""Reading .pt checkpoints without torch (hnet_core.torch_zip): the same tensors as torch.load, bf16
(bit for bit) and strided views included; anything but tensors is refused; `hnet convert torch-to-mlx` with torch
blocked writes exactly what it writes with torch importable."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from hnet_core import HNetError
from hnet_core.torch_zip import read_state_dict

from conftest import FIXTURE_DIR

PT = f"{FIXTURE_DIR}/model.pt"
CFG = f"{FIXTURE_DIR}/config.json"
BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "  # `import torch` now raises ImportError


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def test_reads_the_same_tensors_as_torch_load(tmp_path):
    state = {"bf16": torch.randn(3, 4).to(torch.bfloat16), "transposed": torch.randn(5, 6).t(),
             "slice": torch.arange(10)[2:7], "half": torch.randn(4).half(), "empty": torch.zeros(0, 3),
             "flag": torch.tensor([True, False]), "param": torch.nn.Parameter(torch.ones(2))}
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    for source in [str(path), PT]:
        ours = read_state_dict(source)
        ref = torch.load(source, weights_only=True)
        assert list(ours) == list(ref)
        for name, tensor in ref.items():
            assert ours[name].dtype == str(tensor.dtype).removeprefix("torch.")
            assert ours[name].shape == tuple(tensor.shape)
            array = ours[name].read()  # bf16 as its bits
            assert array.shape == tuple(tensor.shape) and np.array_equal(array, as_numpy(tensor.detach())), name
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, wrapped)
    assert list(read_state_dict(str(wrapped))) == ["w"]


def test_pickled_code_is_refused_with_a_clear_message(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"embeddings.weight": Evil()}, path)
    with pytest.raises(HNetError, match="refusing to load it") as err:
        read_state_dict(str(path))
    assert "system" in str(err.value) and not (tmp_path / "pwned").exists()
    with pytest.raises(HNetError, match="not a zip-format"):
        read_state_dict(CFG)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(PT, "rb").read()[:5000])
    with pytest.raises(HNetError, match="cannot read|not a zip-format"):
        read_state_dict(str(truncated))


def _convert(dst, block_torch: bool, dtype: str | None = None) -> subprocess.CompletedProcess:
    code = (BLOCK_TORCH if block_torch else "") + "from hnet_core.cli import main; main()"
    args = ["convert", "torch-to-mlx", PT, str(dst), "--config", CFG] + (["--dtype", dtype] if dtype else [])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_convert_without_torch_equals_convert_with_torch(tmp_path):
    blocked = _convert(tmp_path / "blocked", block_torch=True)
    assert blocked.returncode == 0, blocked.stderr[-1000:]
    check = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import hnet_mlx.convert, hnet_mlx.mlx_lm_model; "
                            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'hnet_torch'))))"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "['torch']", check.stderr[-500:]  # only the blocker
    with_torch = _convert(tmp_path / "with", block_torch=False)
    assert with_torch.returncode == 0, with_torch.stderr[-1000:]
    a, b = load_file(tmp_path / "blocked" / "model.safetensors"), load_file(tmp_path / "with" / "model.safetensors")
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # and both equal torch.load's tensors (conv1d moved to MLX layout)
    ref = torch.load(PT, weights_only=True)
    for name, tensor in ref.items():
        expected = tensor.numpy()
        if name.endswith("conv1d.weight"):
            expected = expected.swapaxes(1, 2)
        assert np.array_equal(a[name], expected), name


def test_bf16_checkpoint_converts_exactly_without_torch(tmp_path):
    ref = torch.load(PT, weights_only=True)
    bf16 = tmp_path / "bf16.pt"
    torch.save({k: v.to(torch.bfloat16) for k, v in ref.items()}, bf16)
    code = BLOCK_TORCH + (
        "import mlx.core as mx, numpy as np; from hnet_mlx.convert import _read_pt; w = _read_pt(sys.argv[1]); "
        "w = {k: w.load(k) for k in w}; print(all(v.dtype == mx.bfloat16 for v in w.values())); "
        "np.savez(sys.argv[2], **{k: np.array(v.astype(mx.float32)) for k, v in w.items()})")
    out = tmp_path / "back.npz"
    result = subprocess.run([sys.executable, "-c", code, str(bf16), str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-1000:]
    back = np.load(out)
    for name, tensor in ref.items():
        assert np.array_equal(back[name], tensor.to(torch.bfloat16).float().numpy()), name
