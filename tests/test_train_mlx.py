"""`hnet-mlx train / finetune / fuse`: objective, learning, resume, parity with torch, LoRA, mlx.launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import hnet_mlx  # noqa: E402
from conftest import TEXT, config_1stage, config_2stage, tiny_run  # noqa: E402
from hnet_core import checkpoint as ckpt  # noqa: E402
from hnet_core.data import BatchSampler, frame  # noqa: E402
from hnet_core.errors import HNetError  # noqa: E402
from hnet_core.metrics import read_metrics  # noqa: E402
from hnet_mlx import lora as lora_lib  # noqa: E402
from hnet_mlx.objective import local_sums, objective, split_loss  # noqa: E402
from hnet_mlx.train import finetune, finetune_command, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights(path) -> dict[str, np.ndarray]:
    model, _ = hnet_mlx.load(path)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def packed(seed=0, windows=4, seq_len=48):
    data = frame([TEXT.encode()[i:i + 70] for i in range(0, len(TEXT), 70)] * 3)
    batch = BatchSampler(data, seq_len, windows, seed).next_batch()
    return mx.array(batch.input_ids), mx.array(batch.cu_seqlens)


def new_model(config_fn, seed=0):
    mx.random.seed(seed)
    model = hnet_mlx.HNetForCausalLM(config_fn())
    model.init_weights()
    return model


# -- objective -------------------------------------------------------------------------------


@pytest.mark.parametrize("config_fn", [config_1stage, config_2stage])
def test_objective_equals_hnet_loss_in_value_and_gradient(config_fn):
    model = new_model(config_fn)
    ids, cu = packed()
    ratios = [3.0] * model.config.num_stages

    def reference(ids, cu):
        out = model(ids, cu_seqlens=cu)
        return hnet_mlx.hnet_loss(out.logits, ids, out.routing, ratios, alpha=0.5, cu_seqlens=cu)[0]

    def ours(ids, cu):
        return objective(model(ids, cu_seqlens=cu), ids, ratios, alpha=0.5, cu_seqlens=cu)[0]

    ref, ref_grads = nn.value_and_grad(model, reference)(ids, cu)
    loss, grads = nn.value_and_grad(model, ours)(ids, cu)
    assert abs(loss.item() - ref.item()) < 1e-5
    for (name, g), (_, r) in zip(tree_flatten(grads), tree_flatten(ref_grads)):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=1e-6, rtol=1e-4, err_msg=name)


def test_objective_split_over_two_processes_has_the_global_gradient():
    model = new_model(config_2stage, seed=1)
    ids, cu = packed(windows=4)
    cu_np = np.array(cu)
    half = ids.shape[1] // 2

    def whole(ids, cu):
        return objective(model(ids, cu_seqlens=cu), ids, [3.0, 3.0], alpha=0.5, cu_seqlens=cu)[0]

    _, ref = nn.value_and_grad(model, whole)(ids, cu)
    halves = []
    for lo in (0, half):
        sub_cu = np.unique(np.concatenate([cu_np[(cu_np >= lo) & (cu_np <= lo + half)] - lo, [0, half]]))
        halves.append((ids[:, lo:lo + half], mx.array(sub_cu.astype(np.int32))))
    def counts_of(i, c):
        out = model(i, cu_seqlens=c)
        return local_sums(out.logits, i, out.routing, cu_seqlens=c).counts

    totals = counts_of(*halves[0]) + counts_of(*halves[1])

    def part(i, c):
        out = model(i, cu_seqlens=c)
        return split_loss(local_sums(out.logits, i, out.routing, cu_seqlens=c), totals, [3.0, 3.0], 0.5, world=2)

    grads = [dict(tree_flatten(nn.value_and_grad(model, part)(i, c)[1])) for i, c in halves]
    for name, r in tree_flatten(ref):
        np.testing.assert_allclose(np.array((grads[0][name] + grads[1][name]) / 2), np.array(r), atol=2e-6, rtol=1e-4,
                                   err_msg=name)


# -- learning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config_fn,steps,lr", [(config_1stage, 80, 3e-3), (config_2stage, 140, 5e-3)])
def test_tiny_model_overfits_a_small_text(tmp_path, config_fn, steps, lr):
    """Next-byte CE on the 214-byte TEXT falls from ~5.5 nats to below 0.5 nats (0.72 bpb)."""
    cfg, data, tc = tiny_run(tmp_path, config_fn, steps=steps, lr=lr, warmup=10, log_every=10)
    train(cfg, data, str(tmp_path / "run"), tc, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert records[0]["ce"] > 4.5
    assert records[-1]["ce"] < 0.5, [r["ce"] for r in records]


def test_mlx_and_torch_trainers_follow_the_same_trajectory(tmp_path):
    """Same initial weights, data and settings: 5 steps of `hnet train` and `hnet-mlx finetune`
    (full) give the same losses (1e-5) and weights (atol 1e-4)."""
    torch = pytest.importorskip("torch")
    import hnet_torch
    from hnet_torch.train import train as torch_train

    torch.manual_seed(0)
    model = hnet_torch.HNetForCausalLM(config_2stage())
    model.init_weights()
    hnet_torch.save_pretrained(model, tmp_path / "init")
    _, data, tc = tiny_run(tmp_path, steps=5, warmup=2, weight_decay=0.1, text=TEXT * 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_train(None, str(tmp_path / "init"), data, str(tmp_path / "t"), tc, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    finetune(str(tmp_path / "init"), data, str(tmp_path / "m"), tc, show_progress=False)
    lt = [r["loss"] for r in read_metrics(tmp_path / "t" / "metrics.jsonl")]
    lm = [r["loss"] for r in read_metrics(tmp_path / "m" / "metrics.jsonl")]
    np.testing.assert_allclose(lm, lt, atol=1e-5)
    a = hnet_torch.load_pretrained(tmp_path / "t" / "model").state_dict()
    b = hnet_torch.load_pretrained(tmp_path / "m" / "model").state_dict()  # MLX checkpoints load in torch
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_bfloat16_mixed_precision_trains(tmp_path):
    cfg, data, tc = tiny_run(tmp_path, steps=15, dtype="bfloat16", log_every=5)
    train(cfg, data, str(tmp_path / "run"), tc, show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["ce"] < records[0]["ce"] - 1.0
    model, _ = hnet_mlx.load(tmp_path / "run" / "model")
    assert model.embeddings.weight.dtype == mx.bfloat16


# -- resume ------------------------------------------------------------------------------------


def test_resume_matches_an_uninterrupted_run(tmp_path):
    """12 steps straight vs 6 + resume + 6 (the issue's 2k vs 1k+1k scaled down): weights equal
    to 1e-6 and the same loss curve."""
    cfg, data, tc = tiny_run(tmp_path, config_2stage, steps=12, save_every=6)
    train(cfg, data, str(tmp_path / "straight"), tc, show_progress=False)
    train(cfg, data, str(tmp_path / "split"), tc, stop_at=6, show_progress=False)
    train(None, data, str(tmp_path / "split"), tc, resume="latest", show_progress=False)
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "split" / "model")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)
    la = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert len(la) == len(lb) == 12 and np.allclose(la, lb, atol=1e-6)


def test_resuming_a_torch_run_with_mlx_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from hnet_torch.train import train as torch_train

    cfg, data, tc = tiny_run(tmp_path, steps=2, save_every=1)
    torch.set_num_threads(1)
    torch_train(cfg, None, data, str(tmp_path / "run"), tc, stop_at=1, show_progress=False)
    with pytest.raises(HNetError, match="written by the torch trainer"):
        train(None, data, str(tmp_path / "run"), tc, resume="latest", show_progress=False)


# -- LoRA --------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_fused_model_equals_adapted_model(tmp_path):
    cfg, data, tc = tiny_run(tmp_path, config_2stage, steps=6, save_every=3, lr=1e-2)
    train(cfg, data, str(tmp_path / "base"), tc.replace(steps=2), show_progress=False)
    base_dir = str(tmp_path / "base" / "model")
    base = weights(base_dir)
    finetune(base_dir, data, str(tmp_path / "ft"), tc, lora_rank=4, show_progress=False)
    adapter_dir = lora_lib.find_adapter_dir(str(tmp_path / "ft"))
    assert adapter_dir.endswith("adapters")
    model, settings = lora_lib.load_adapted(None, adapter_dir)
    params = dict(tree_flatten(model.parameters()))
    lora_params = {k: v for k, v in params.items() if k.endswith((".lora_a", ".lora_b"))}
    assert len(lora_params) == 2 * len(settings["adapted"]) > 0
    assert any(float(mx.abs(v).max().item()) > 0 for k, v in lora_params.items() if k.endswith(".lora_b"))
    for name, value in params.items():  # every base weight is bit-for-bit the base model's
        if name in lora_params:
            continue
        original = name.replace(".base.", ".")
        assert np.array_equal(np.array(value), base[original]), name
    ids, cu = packed()
    adapted = np.array(model(ids, cu_seqlens=cu).logits)
    baseline = np.array(hnet_mlx.load(base_dir)[0](ids, cu_seqlens=cu).logits)
    assert np.abs(adapted - baseline).max() > 1e-3  # the adapters do something
    result = CliRunner().invoke(lora_lib.fuse_command, ["--adapters", str(tmp_path / "ft"), "--out", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    fused, _ = hnet_mlx.load(tmp_path / "fused")
    np.testing.assert_allclose(np.array(fused(ids, cu_seqlens=cu).logits), adapted, atol=2e-5)
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    torch = pytest.importorskip("torch")
    import hnet_torch

    fused_torch = hnet_torch.load_pretrained(tmp_path / "fused")
    with torch.no_grad():
        t_logits = fused_torch(torch.from_numpy(np.array(ids)).long(), cu_seqlens=torch.from_numpy(np.array(cu)).long()).logits
    assert np.abs(t_logits.numpy() - adapted).max() < 1e-4


def test_lora_resume_continues_the_adapters(tmp_path):
    cfg, data, tc = tiny_run(tmp_path, steps=6, save_every=3)
    train(cfg, data, str(tmp_path / "base"), tc.replace(steps=1), show_progress=False)
    base_dir = str(tmp_path / "base" / "model")
    finetune(base_dir, data, str(tmp_path / "straight"), tc, lora_rank=2, show_progress=False)
    finetune(base_dir, data, str(tmp_path / "split"), tc, lora_rank=2, stop_at=3, show_progress=False)
    finetune(None, data, str(tmp_path / "split"), tc, resume="latest", show_progress=False)
    a = mx.load(str(tmp_path / "straight" / "adapters" / lora_lib.ADAPTERS_NAME))
    b = mx.load(str(tmp_path / "split" / "adapters" / lora_lib.ADAPTERS_NAME))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)


def test_lora_finetune_says_it_wrote_adapters_and_how_to_fuse_them(tmp_path):
    """A LoRA run writes OUT/adapters and no OUT/model: the closing line must name what exists and give the
    fuse command, and that command must work as printed."""
    cfg, data, tc = tiny_run(tmp_path, steps=1)
    train(cfg, data, str(tmp_path / "base"), tc, show_progress=False)
    out = tmp_path / "ft"
    result = CliRunner().invoke(finetune_command, ["--model", str(tmp_path / "base" / "model"), "--data", data,
                                                   "--out", str(out), "--lora", "--lora-rank", "2", "--steps", "2",
                                                   "--batch-size", "2", "--seq-len", "32", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    assert not (out / "model").exists() and (out / "adapters").is_dir()
    assert "final model in" not in result.output
    assert f"LoRA adapters in {out / 'adapters'}" in result.output
    command = f"hnet-mlx fuse --adapters {out} --out {out / 'fused'}"
    assert command in result.output
    fused = CliRunner().invoke(lora_lib.fuse_command, command.split()[2:])
    assert fused.exit_code == 0, fused.output
    assert hnet_mlx.load(out / "fused")[1].d_model == config_1stage().d_model


def test_lora_cli_errors(tmp_path):
    cfg, data, tc = tiny_run(tmp_path, steps=1)
    train(cfg, data, str(tmp_path / "base"), tc, show_progress=False)
    runner = CliRunner()
    result = runner.invoke(finetune_command, ["--model", str(tmp_path / "base" / "model"), "--data", data, "--out",
                                              str(tmp_path / "ft"), "--lora", "--lora-layers", "nope"])
    assert "unknown layer 'nope'" in str(result.exception)
    result = runner.invoke(lora_lib.fuse_command, ["--adapters", str(tmp_path / "base"), "--out", str(tmp_path / "x")])
    assert "no LoRA adapters found" in str(result.exception)
    result = runner.invoke(finetune_command, ["--data", data, "--out", str(tmp_path / "ft2")])
    assert "give --model DIR" in str(result.exception)


# -- multi-process -----------------------------------------------------------------------------


def test_mlx_launch_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    script = shutil.which("hnet-mlx", path=os.path.dirname(sys.executable))
    if launcher is None or script is None:
        pytest.skip("mlx.launch / hnet-mlx scripts not installed")
    cfg, data, tc = tiny_run(tmp_path, config_2stage, steps=3, batch_size=4, save_every=3)
    train(cfg, data, str(tmp_path / "one"), tc, show_progress=False)
    args = ["train", "--config", cfg, "--data", data, "--out", str(tmp_path / "two"), "--steps", "3", "--batch-size", "4",
            "--seq-len", "64", "--lr", "3e-3", "--warmup", "5", "--val-fraction", "0", "--log-every", "1"]
    proc = subprocess.run([launcher, "-n", "2", "--backend", "ring", script, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    state = ckpt.read_state(ckpt.latest_checkpoint(str(tmp_path / "two")))
    assert state["world_size"] == 2
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, rtol=1e-4, err_msg=k)
    la = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert np.allclose(la, lb, atol=1e-5), (la, lb)
    assert json.load(open(tmp_path / "two" / "train_config.json"))["batch_size"] == 4


def test_padded_batches_train_the_same_as_torch(tmp_path):
    """--packing padded in MLX follows the torch trainer step for step (3 steps, same init)."""
    torch = pytest.importorskip("torch")
    import hnet_torch
    from hnet_torch.train import train as torch_train

    torch.manual_seed(0)
    model = hnet_torch.HNetForCausalLM(config_1stage())
    model.init_weights()
    hnet_torch.save_pretrained(model, tmp_path / "init")
    _, data, tc = tiny_run(tmp_path, steps=3, warmup=1, packing="padded", text=TEXT * 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_train(None, str(tmp_path / "init"), data, str(tmp_path / "t"), tc, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    finetune(str(tmp_path / "init"), data, str(tmp_path / "m"), tc, show_progress=False)
    lt = [r["loss"] for r in read_metrics(tmp_path / "t" / "metrics.jsonl")]
    lm = [r["loss"] for r in read_metrics(tmp_path / "m" / "metrics.jsonl")]
    np.testing.assert_allclose(lm, lt, atol=1e-5)
