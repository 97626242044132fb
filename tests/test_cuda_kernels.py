"""hnet_torch on an NVIDIA GPU: the pure path reproduces the official fixture there; FlexAttention and
the compiled scan / training step (torch only, no extra package) agree with the pure path in fp32
and bf16 with the tolerances stated per test, and reproduce the fixture; the source-built kernels
(mamba_ssm's Triton scan and state update, causal-conv1d, flash-attn), where installed, agree with
the pure path. Everything here skips cleanly without CUDA or without the packages."""

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


# -- FlexAttention and torch.compile on CUDA (nothing here needs a package beyond torch) ------------


def _qkv_cuda(b, l, h=4, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, l, h, d, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3)]


@cuda
@pytest.mark.parametrize("window", [4, 100, 5000, -1], ids=["w4", "w100", "w_longer_than_seq", "global"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_flex_attention_matches_sdpa_on_cuda_fp32_and_bf16(window, packed):
    """fp32: forward 1e-5, gradients 1e-4 (relative to their max). bf16: flex's error against the
    fp32 reference stays within 2x masked-SDPA-in-bf16's own error + 1e-3 (both are bf16 roundings)."""
    b, l = (1, 1000) if packed else (2, 700)
    seq_idx = None
    if packed:
        seq_idx = torch.repeat_interleave(torch.arange(4, device="cuda"), torch.tensor([300, 1, 500, 199], device="cuda"))[None]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv_cuda(b, l, dtype=dtype)
        for impl in ("sdpa", "flex"):
            out = kernels.attention(q, k, v, window, seq_idx=seq_idx, mode=f"attention={impl}")
            grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum(), (q, k, v))
            results[dtype, impl] = (out.float(), [g.float() for g in grads])
    (o_s, g_s), (o_f, g_f) = results[torch.float32, "sdpa"], results[torch.float32, "flex"]
    assert (o_f - o_s).abs().max() <= 1e-5 * o_s.abs().max().clamp(min=1)
    for a, c in zip(g_s, g_f):
        assert (c - a).abs().max() <= 1e-4 * a.abs().max()
    (ob_s, gb_s), (ob_f, gb_f) = results[torch.bfloat16, "sdpa"], results[torch.bfloat16, "flex"]
    assert (ob_f - o_s).abs().max() <= 2 * (ob_s - o_s).abs().max() + 1e-3
    for ref, a, c in zip(g_s, gb_s, gb_f):
        assert (c - ref).abs().max() <= 2 * (a - ref).abs().max() + 1e-3 * ref.abs().max()


@cuda
def test_flex_packed_documents_never_see_each_other_on_cuda():
    seq_idx = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor([130, 257, 90], device="cuda"))[None]
    q, k, v = (t.detach() for t in _qkv_cuda(1, 477))
    out = kernels.attention(q, k, v, -1, seq_idx=seq_idx, mode="attention=flex")
    for doc in range(3):
        other = (seq_idx != doc)[..., None, None]
        out2 = kernels.attention(q, torch.where(other, k * 3 + 1, k), torch.where(other, -v, v), -1, seq_idx=seq_idx,
                                 mode="attention=flex")
        mine = (seq_idx == doc)[0]
        assert torch.equal(out2[:, mine], out[:, mine])


@cuda
def test_official_fixture_reproduced_with_flex_attention_and_compiled_scan():
    model = load_pretrained(f"{FIXTURE_DIR}/model.pt", config=f"{FIXTURE_DIR}/config.json", device="cuda")
    model.set_kernels("scan=compiled,conv=pure,attention=flex")
    exp = np.load(f"{FIXTURE_DIR}/expected.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(exp["single_L100.input_ids"]).cuda())
    assert np.abs(out.logits.cpu().numpy() - exp["single_L100.logits"]).max() <= 1e-4
    assert np.array_equal(out.routing[0].boundary_mask.cpu().numpy(), exp["single_L100.stage0.boundary_mask"])


@cuda
@pytest.mark.parametrize("name", ["1stage", "2stage", "3stage"])
def test_compiled_training_step_on_cuda_matches_eager(name):
    """fp32 (TF32 off): loss 1e-5 relative, gradients 1e-3 of each tensor's max. bf16 autocast: the
    loss within 2e-2 relative (boundary decisions may flip in bf16, so gradients are not compared)."""
    import copy

    from conftest import SMALL_CONFIGS
    from hnet_torch.objective import objective
    from hnet_torch.train import compile_counters, compile_model

    torch._dynamo.reset()
    eager = random_torch_model(SMALL_CONFIGS[name]()).cuda().train()
    eager.set_kernels("off")
    fast = copy.deepcopy(eager)
    fast.set_kernels("scan=compiled,conv=pure,attention=flex")
    compile_model(fast)
    text = torch.tensor(list((TEXT * 4).encode()), device="cuda")
    cu = torch.tensor([0, 60, 105, 186], device="cuda")
    ids = text[:186][None]
    ratios = [3.0] * SMALL_CONFIGS[name]().num_stages
    for dtype in (None, torch.bfloat16):
        losses, grads = [], []
        for m in (eager, fast):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = m(ids, cu_seqlens=cu)
            loss, _ = objective(out, ids, ratios, 0.03, cu_seqlens=cu)
            loss.backward()
            losses.append(float(loss))
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        if dtype is None:
            assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0])
            for key in grads[0]:
                assert (grads[1][key] - grads[0][key]).abs().max() <= 1e-3 * grads[0][key].abs().max().clamp(min=1e-6), key
        else:
            assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0])
    assert compile_counters()["graph_breaks"] == 0
