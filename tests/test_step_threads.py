"""The decode step's thread policy (hnet_core/step_threads.py, hnet_torch/threads.py): small
matrices step on one thread, large ones keep torch's setting, and the process-wide setting is
restored after every step."""

import pytest
import torch

from hnet_core import step_threads
from hnet_core.config import HNetConfig
from hnet_core.official import official_config
from hnet_core.tokenizer import encode
from hnet_torch import threads
from hnet_torch.lm import HNetForCausalLM

from conftest import TEXT, config_1stage, config_2stage, config_3stage, random_torch_model


def threads_seen_by_step(model, monkeypatch) -> list[int]:
    seen = []
    model.embeddings.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    cache = model.allocate_inference_cache(batch_size=1)
    with torch.no_grad():
        model(torch.tensor([encode(TEXT[:20])]), cache=cache)
        seen.clear()  # prefill keeps torch's setting; only the steps are checked
        model.step(torch.tensor([[65]]), cache)
    return seen


def test_small_model_steps_on_one_thread_and_restores_the_setting(monkeypatch):
    monkeypatch.delenv(step_threads.ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = random_torch_model(config_2stage())
        assert threads_seen_by_step(model, monkeypatch) == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("make_config", [config_1stage, config_2stage, config_3stage])
def test_largest_matrix_estimate_matches_the_built_model(make_config):
    config = make_config()
    model = HNetForCausalLM(config, device="meta")
    largest = max(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert step_threads.largest_matrix_elements(config) == largest


def test_official_sizes_step_in_parallel_and_the_bundled_model_does_not():
    bundled = HNetConfig.from_json("hnet_core/demo_model/config.json")
    assert not step_threads.steps_in_parallel(bundled)
    assert step_threads.steps_in_parallel(official_config("hnet_2stage_XL"))


def test_environment_overrides_the_choice(monkeypatch):
    model = random_torch_model(config_2stage())
    monkeypatch.setenv(step_threads.ENV, "2")
    before = torch.get_num_threads()
    try:
        assert threads_seen_by_step(model, monkeypatch) == [2]
    finally:
        torch.set_num_threads(before)


def test_mlx_small_model_steps_on_one_blas_thread_and_prefill_on_all():
    mx = pytest.importorskip("mlx.core")
    from hnet_mlx import blas

    from mlx_helpers import mlx_from_torch

    if blas.get_threads() is None:
        pytest.skip("MLX uses no OpenBLAS here")
    model = mlx_from_torch(random_torch_model(config_2stage()))
    before = blas.get_threads()
    if before < 2:
        pytest.skip("OpenBLAS runs one thread here")
    cache = model.allocate_inference_cache(batch_size=1)
    mx.eval(model(mx.array([encode(TEXT[:20])]), cache=cache).logits)
    assert blas.get_threads() == before
    mx.eval(model.step(mx.array([[65]]), cache).logits)
    assert blas.get_threads() == 1
    mx.eval(model(mx.array([encode(TEXT[:20])])).logits)
    assert blas.get_threads() == before
