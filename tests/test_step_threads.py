"""The decode step's thread policy (hnet_torch/threads.py): small matrices step on one thread,
large ones keep torch's setting, and the process-wide setting is restored after every step."""

import torch
import torch.nn as nn

from hnet_core.tokenizer import encode
from hnet_torch import threads

from conftest import TEXT, config_2stage, random_torch_model


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
    monkeypatch.delenv(threads.ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = random_torch_model(config_2stage())
        assert threads_seen_by_step(model, monkeypatch) == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_large_matrices_keep_every_thread():
    big = nn.Linear(4096, 1024, bias=False)  # 4M elements: the parallel threshold
    small = nn.Linear(1024, 1023, bias=False)
    assert threads.step_thread_count(small) == 1
    assert threads.step_thread_count(big) == torch.get_num_threads()


def test_environment_overrides_the_choice(monkeypatch):
    model = random_torch_model(config_2stage())
    monkeypatch.setenv(threads.ENV, "2")
    before = torch.get_num_threads()
    try:
        assert threads_seen_by_step(model, monkeypatch) == [2]
    finally:
        torch.set_num_threads(before)
