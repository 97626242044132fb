"""hnet_torch on an NVIDIA GPU: the pure path reproduces the official fixture there, and the fused
kernels (mamba_ssm's Triton scan and state update, causal-conv1d, flash-attn), where installed,
agree with the pure path. Everything here skips cleanly without CUDA or without the packages."""

import numpy as np
import pytest
import torch

from hnet_core.tokenizer import encode
from hnet_torch import kernels, load_pretrained

from conftest import FIXTURE_DIR, TEXT, config_2stage, padded_batch, random_torch_model

pytestmark = pytest.mark.cuda
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def needs(getter, what):
    return pytest.mark.skipif(getter() is None, reason=f"{what} is not installed")


@cuda
def test_pure_path_on_cuda_matches_official_fixture():
    model = load_pretrained(f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json", device="cuda")
    model.set_kernels("off")
    exp = np.load(f"{FIXTURE_DIR}/expected.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(exp["single_L100.input_ids"]).cuda())
        assert np.abs(out.logits.cpu().numpy() - exp["single_L100.logits"]).max() <= 1e-4
        assert np.array_equal(out.routing[0].boundary_mask.cpu().numpy(), exp["single_L100.stage0.boundary_mask"])
        prompt = torch.from_numpy(exp["gen_tf.prompt_ids"]).cuda()
        cache = model.allocate_inference_cache(1, int(exp["gen_tf.max_seqlen"]))
        model(prompt, cache=cache)
        for k, byte in enumerate(exp["gen_tf.fed_ids"]):
            step = model.step(torch.tensor([[int(byte)]], device="cuda"), cache)
            assert np.abs(step.logits[0, -1].cpu().numpy() - exp["gen_tf.step_logits"][k]).max() <= 1e-4


@cuda
@needs(kernels._mamba_ssd, "mamba_ssm")
def test_fused_ssd_scan_matches_pure_scan_with_sequence_restarts():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, n = 2, 300, 4, 64, 16
    x = torch.randn(b, l, h, p, device="cuda", generator=g)
    dt = torch.rand(b, l, h, device="cuda", generator=g) * 0.2
    A = -torch.rand(h, device="cuda", generator=g) * 4
    B = torch.randn(b, l, 1, n, device="cuda", generator=g)
    C = torch.randn(b, l, 1, n, device="cuda", generator=g)
    D = torch.randn(h, device="cuda", generator=g)
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq_idx[:, 100:] = 1
    seq_idx[:, 257:] = 2
    for s in (None, seq_idx):
        y_f, st_f = kernels.ssd_scan(x, dt, A, B, C, 64, D, seq_idx=s, mode="on")
        y_p, st_p = kernels.ssd_scan(x, dt, A, B, C, 64, D, seq_idx=s, mode="off")
        assert (y_f - y_p).abs().max() <= 2e-3 * y_p.abs().max()
        assert (st_f - st_p).abs().max() <= 2e-3 * st_p.abs().max()


@cuda
@needs(kernels._mamba_state_update, "mamba_ssm")
def test_fused_state_update_matches_pure_step():
    g = torch.Generator(device="cuda").manual_seed(1)
    b, h, p, n = 3, 4, 64, 16
    state = torch.randn(b, h, p, n, device="cuda", generator=g)
    x = torch.randn(b, h, p, device="cuda", generator=g)
    dt = torch.randn(b, h, device="cuda", generator=g)
    args = (torch.randn(h, device="cuda", generator=g), -torch.rand(h, device="cuda", generator=g),
            torch.randn(b, 1, n, device="cuda", generator=g), torch.randn(b, 1, n, device="cuda", generator=g),
            torch.randn(h, device="cuda", generator=g))
    y_f, s_f = kernels.ssm_step(state, x, dt, *args, mode="on")
    y_p, s_p = kernels.ssm_step(state, x, dt, *args, mode="off")
    assert (y_f - y_p).abs().max() <= 1e-4 and (s_f - s_p).abs().max() <= 1e-4


@cuda
@needs(kernels._mamba_ssd, "mamba_ssm")
def test_model_with_auto_kernels_matches_pure_model_on_cuda():
    model = random_torch_model(config_2stage()).cuda()
    seqs = [encode(TEXT[:90]), encode(TEXT[100:140])]
    ids, mask = padded_batch(seqs)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        model.set_kernels("off")
        ref = model(ids, mask=mask)
        model.set_kernels("auto")
        fused = model(ids, mask=mask)
        assert (fused.logits - ref.logits)[mask].abs().max() <= 1e-3
        for a, b in zip(fused.routing, ref.routing):
            assert torch.equal(a.boundary_mask, b.boundary_mask)
        cache = model.allocate_inference_cache(2, 128)
        model(ids, mask=mask, cache=cache)
        step = model.step(torch.tensor([[65], [66]], device="cuda"), cache)
        model.set_kernels("off")
        cache2 = model.allocate_inference_cache(2, 128)
        model(ids, mask=mask, cache=cache2)
        step2 = model.step(torch.tensor([[65], [66]], device="cuda"), cache2)
        assert (step.logits - step2.logits).abs().max() <= 1e-3


@cuda
def test_bf16_on_cuda_stays_close_to_fp32():
    model = load_pretrained(f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json", device="cuda")
    model_bf16 = load_pretrained(f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json", device="cuda",
                                 dtype="bfloat16")
    ids = torch.tensor([encode(TEXT[:100])], device="cuda")
    with torch.no_grad():
        a = model(ids).logits
        b = model_bf16(ids).logits.float()
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
