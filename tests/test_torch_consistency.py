"""Internal consistency of hnet_torch on 1-, 2- and 3-stage configs of our own:
prefill + step == full forward, batched step == each sample alone, packed == masked,
and padding never changes valid positions."""

import pytest
import torch

from hnet_core.tokenizer import encode

from conftest import TEXT, padded_batch, random_torch_model

ATOL = 1e-4


@pytest.fixture
def model(small_config):
    return random_torch_model(small_config)


def assert_same_routing(a, b, sl_a=slice(None), sl_b=slice(None)):
    for ra, rb in zip(a, b):
        assert torch.equal(ra.boundary_mask[sl_a], rb.boundary_mask[sl_b])


@torch.no_grad()
def test_routing_is_not_trivial(model):
    out = model(torch.tensor([encode(TEXT)]))
    for r in out.routing:
        rate = r.boundary_mask[r.valid].float().mean().item()
        assert 0.15 < rate < 0.85  # both decisions occur at every stage, so the tests below mean something


@pytest.mark.parametrize("prefill_len", [1, 6, 41])
@torch.no_grad()
def test_prefill_then_step_equals_full_forward_at_every_position(model, prefill_len):
    ids = torch.tensor([encode(TEXT[:110])])
    full = model(ids)
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=ids.shape[1])
    out = model(ids[:, :prefill_len], cache=cache)
    logits = [out.logits]
    masks = [[r.boundary_mask for r in out.routing]]
    for t in range(prefill_len, ids.shape[1]):
        step = model.step(ids[:, t : t + 1], cache)
        logits.append(step.logits)
    assert (torch.cat(logits, 1) - full.logits).abs().max() <= ATOL
    assert torch.equal(masks[0][0], full.routing[0].boundary_mask[:, :prefill_len])


@torch.no_grad()
def test_step_boundaries_equal_forward_boundaries(model):
    ids = torch.tensor([encode(TEXT[:90])])
    full = model(ids)
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=ids.shape[1])
    model(ids[:, :1], cache=cache)
    stage0 = [bool(full.routing[0].boundary_mask[0, 0])]
    for t in range(1, ids.shape[1]):
        stage0.append(bool(model.step(ids[:, t : t + 1], cache).routing[0].boundary_mask[0, 0]))
    assert stage0 == full.routing[0].boundary_mask[0].tolist()


@torch.no_grad()
def test_batched_generation_steps_equal_each_prompt_alone(model):
    prompts = [encode(TEXT[:12]), encode(TEXT[20:47]), encode(TEXT[50:53])]
    feeds = [encode(TEXT[60 + 9 * i : 90 + 9 * i], add_bos=False) for i in range(3)]
    ids, mask = padded_batch(prompts)
    cache = model.allocate_inference_cache(batch_size=3, max_seqlen=64)
    out = model(ids, mask=mask, cache=cache)
    batched = [out.logits[torch.arange(3), mask.sum(-1) - 1]]
    for t in range(25):
        batched.append(model.step(torch.tensor([[f[t]] for f in feeds]), cache).logits[:, 0])
    batched = torch.stack(batched, 1)
    for i, p in enumerate(prompts):
        c = model.allocate_inference_cache(batch_size=1, max_seqlen=64)
        alone = [model(torch.tensor([p]), cache=c).logits[:, -1]]
        for t in range(25):
            alone.append(model.step(torch.tensor([[feeds[i][t]]]), c).logits[:, 0])
        assert (batched[i] - torch.stack(alone, 1)[0]).abs().max() <= ATOL


@torch.no_grad()
def test_packed_equals_masked(model):
    seqs = [encode(TEXT[:37]), encode(TEXT[40:101]), encode(TEXT[5:9])]
    ids, mask = padded_batch(seqs)
    masked = model(ids, mask=mask)
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist())
    packed = model(torch.cat([torch.tensor(s) for s in seqs])[None], cu_seqlens=cu)
    for i, s in enumerate(seqs):
        a, b = int(cu[i]), int(cu[i + 1])
        assert (packed.logits[0, a:b] - masked.logits[i, : len(s)]).abs().max() <= ATOL
        assert torch.equal(packed.routing[0].boundary_mask[0, a:b], masked.routing[0].boundary_mask[i, : len(s)])


@torch.no_grad()
def test_padding_never_changes_valid_positions(model):
    seqs = [encode(TEXT[:50]), encode(TEXT[60:80])]
    ids, mask = padded_batch(seqs, pad=0)
    ids_other, _ = padded_batch(seqs, pad=97)
    a, b = model(ids, mask=mask), model(ids_other, mask=mask)
    alone = model(torch.tensor([seqs[1]]))
    assert (a.logits[mask] - b.logits[mask]).abs().max() <= ATOL
    assert (a.logits[1, : len(seqs[1])] - alone.logits[0]).abs().max() <= ATOL
    for ra, rb in zip(a.routing, b.routing):
        assert torch.equal(ra.boundary_mask & ra.valid, rb.boundary_mask & rb.valid)


def test_packed_and_masked_gradients_agree(small_config):
    model = random_torch_model(small_config).train()
    from hnet_torch.loss import hnet_loss

    seqs = [encode(TEXT[:40]), encode(TEXT[45:70])]
    targets = [3.0] * small_config.num_stages
    ids, mask = padded_batch(seqs)
    grads = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            cu = torch.tensor([0, len(seqs[0]), len(seqs[0]) + len(seqs[1])])
            flat = torch.cat([torch.tensor(s) for s in seqs])[None]
            out = model(flat, cu_seqlens=cu)
            loss = hnet_loss(out.logits, flat, out.routing, targets, cu_seqlens=cu)[1]
        else:
            out = model(ids, mask=mask)
            loss = hnet_loss(out.logits, ids, out.routing, targets, mask=mask)[1]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n, g in grads[0].items():
        assert (g - grads[1][n]).abs().max() <= 1e-4 * max(g.abs().max().item(), 1e-3), n
