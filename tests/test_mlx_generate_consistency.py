"""Internal consistency of hnet_mlx decoding on the 1-, 2- and 3-stage configs: prefill + step ==
full forward at every position (logits and every stage's boundaries), a batch of ragged prompts
stepped together == each sample alone, the compiled step == the uncompiled one, and greedy
generation picks the same bytes as hnet_torch on the same weights."""

import mlx.core as mx
import numpy as np
import pytest

import hnet_mlx
import hnet_torch
from hnet_core import HNetError
from hnet_core.tokenizer import encode
from hnet_core.engine import prompt_batch
from hnet_mlx.cache import isotropic_states

from conftest import TEXT, config_2stage, random_torch_model
from mlx_helpers import mlx_from_torch, np_

ATOL = 1e-4


@pytest.fixture
def model(small_config):
    return mlx_from_torch(random_torch_model(small_config))


def test_routing_is_not_trivial(model):
    out = model(mx.array([encode(TEXT)]))
    for r in out.routing:
        valid = np.ones(r.boundary_mask.shape, bool) if r.valid is None else np_(r.valid)
        rate = np_(r.boundary_mask)[valid].mean()
        assert 0.15 < rate < 0.85  # both decisions occur at every stage, so the tests below mean something


@pytest.mark.parametrize("prefill_len, step_mode", [(1, "fused"), (41, "fused"), (1, "split")])
def test_prefill_then_step_equals_full_forward_at_every_position(model, prefill_len, step_mode):
    model.step_mode = step_mode  # "split" skips inner levels on non-boundary bytes: B = 1 exercises it
    ids = mx.array([encode(TEXT[:110])])
    L = ids.shape[1]
    full = model(ids)
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=L)
    out = model(ids[:, :prefill_len], cache=cache)
    logits = [np_(out.logits)]
    # Boundary decisions per stage, in the order the stage sees its tokens.
    stage_masks = [list(np_(r.boundary_mask)[np_(r.valid)]) for r in out.routing]
    for t in range(prefill_len, L):
        step = model.step(ids[:, t : t + 1], cache)
        logits.append(np_(step.logits))
        for s, r in enumerate(step.routing):
            ran = bool(np_(r.valid)[0, 0]) if r.valid is not None else True
            if ran:
                stage_masks[s].append(bool(np_(r.boundary_mask)[0, 0]))
            else:  # a stage that did not run reports NaN, like the official step
                assert np.isnan(np_(r.boundary_prob)[0, 0]) and not np_(r.boundary_mask)[0, 0]
    assert np.abs(np.concatenate(logits, 1) - np_(full.logits)).max() <= ATOL
    for s, r in enumerate(full.routing):
        assert stage_masks[s] == list(np_(r.boundary_mask)[np_(r.valid)]), f"stage {s}"


def test_split_step_grows_each_stack_only_on_the_steps_that_run_it(model):
    # An inner stack that took one more bound every byte would grow its attention caches with the
    # bytes, not with its chunks (and every step's slot write copies them whole).
    model.step_mode = "split"
    ids = mx.array([encode(TEXT[:80])])
    cache = model.allocate_inference_cache(batch_size=1)  # grows
    model(ids[:, :1], cache=cache)
    for t in range(1, ids.shape[1]):
        model.step(ids[:, t : t + 1], cache)
    stacks = isotropic_states(cache.backbone)
    assert [s.max_length for s in stacks] == [int(s.lengths.max().item()) for s in stacks]
    assert stacks[0].max_length > stacks[len(stacks) // 2].max_length  # some bytes skipped the inner level


@pytest.mark.parametrize("step_mode", ["fused", "split"])
def test_batched_step_with_ragged_prompts_equals_each_sample_alone(model, step_mode):
    model.step_mode = step_mode
    texts = [TEXT[:37], TEXT[50:55], TEXT[60:81]]
    cont = [encode(TEXT[90:130], add_bos=False), encode(TEXT[20:60], add_bos=False), encode(TEXT[130:170], add_bos=False)]
    n_steps = 24
    ids, mask = (mx.array(a) for a in prompt_batch(texts, 0))
    cache = model.allocate_inference_cache(batch_size=3, max_seqlen=ids.shape[1] + n_steps)
    out = model(ids, mask=mask, cache=cache)
    lengths = np_(mask).sum(-1)
    batched = [[np_(out.logits)[b, lengths[b] - 1]] for b in range(3)]
    for k in range(n_steps):
        step = model.step(mx.array([[c[k]] for c in cont]), cache)
        for b in range(3):
            batched[b].append(np_(step.logits)[b, 0])
    for b in range(3):
        alone = mx.array([encode(texts[b]) + cont[b][:n_steps]])
        ref = np_(model(alone).logits)[0, lengths[b] - 1 :]
        assert np.abs(np.stack(batched[b]) - ref).max() <= ATOL, f"sample {b}"


def test_every_step_mode_compiled_or_not_gives_the_same_outputs(model):
    ids = mx.array([encode(TEXT[:30]), encode(TEXT[40:70])])
    results = {}
    for mode in ("fused", "split"):
        for compiled in (True, False):
            model.step_mode, model.compile_step = mode, compiled
            cache = model.allocate_inference_cache(batch_size=2, max_seqlen=40)
            model(ids[:, :20], cache=cache)
            outs = []
            for t in range(20, 30):
                o = model.step(ids[:, t : t + 1], cache)
                outs += [np_(o.logits)] + [np.nan_to_num(np_(x), nan=-1.0) for r in o.routing
                                           for x in (r.boundary_prob, r.boundary_mask, r.selected_probs)]
            results[mode, compiled] = np.concatenate([o.reshape(2, -1) for o in outs], 1)
    model.step_mode, model.compile_step = "auto", True
    for key, value in results.items():
        assert np.abs(value - results["fused", True]).max() <= 1e-6, key


def test_auto_step_mode_fuses_small_models_on_a_gpu_and_splits_on_the_cpu(model):
    cache = model.allocate_inference_cache(batch_size=1, max_seqlen=8)
    before = mx.default_device()
    try:
        mx.set_default_device(mx.cpu)
        assert model.resolve_step_mode(cache) == "split"
        if mx.metal.is_available():
            mx.set_default_device(mx.gpu)
            assert model.resolve_step_mode(cache) == "fused"
    finally:
        mx.set_default_device(before)
    model.step_mode = "sometimes"
    with pytest.raises(HNetError, match="step_mode"):
        model.resolve_step_mode(cache)


def test_compiled_step_sees_updated_weights():
    model = mlx_from_torch(random_torch_model(config_2stage()))
    ids = mx.array([encode(TEXT[:12])])

    def run():
        cache = model.allocate_inference_cache(batch_size=1, max_seqlen=16)
        model(ids[:, :8], cache=cache)
        return np.concatenate([np_(model.step(ids[:, t : t + 1], cache).logits) for t in range(8, 12)], 1)

    before = run()
    model.lm_head.weight = model.lm_head.weight * 2.0
    after = run()  # same cache shape: the compiled function is reused, and must read the new weight
    model.compile_step = False
    fresh = run()
    model.compile_step = True
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(after - fresh).max() <= 1e-6


def test_greedy_generation_picks_the_same_bytes_as_torch():
    tm = random_torch_model(config_2stage())
    mm = mlx_from_torch(tm)
    prompts = ["The old lighthouse", "He wrote"]
    got_t = hnet_torch.generate(tm, prompts, max_tokens=24, temperature=0)
    got_m = hnet_mlx.generate(mm, prompts, max_tokens=24, temperature=0)
    assert got_m == got_t


def test_sampling_with_a_seed_is_reproducible():
    mm = mlx_from_torch(random_torch_model(config_2stage()))
    a = hnet_mlx.generate(mm, "Hello", max_tokens=16, temperature=1.0, top_k=20, seed=7)
    b = hnet_mlx.generate(mm, "Hello", max_tokens=16, temperature=1.0, top_k=20, seed=7)
    assert a == b


def test_cache_misuse_raises_one_line_errors():
    mm = mlx_from_torch(random_torch_model(config_2stage()))
    ids = mx.array([encode("abc")])
    cache = mm.allocate_inference_cache(batch_size=1, max_seqlen=5)
    with pytest.raises(HNetError, match="prefill the cache first"):
        mm.step(ids[:, :1], cache)
    mm(ids, cache=cache)
    with pytest.raises(HNetError, match="exceed the cache's max_seqlen 5"):  # a limit when given
        mm(ids, cache=cache)
    with pytest.raises(HNetError, match="shape"):
        mm.step(ids[:, :2], cache)
    with pytest.raises(HNetError, match="byte values"):
        mm.step(mx.array([[300]]), cache)
    mm.step(ids[:, :1], cache)
    with pytest.raises(HNetError, match="max_seqlen"):
        mm.step(ids[:, :1], cache)
    with pytest.raises(HNetError, match="right-padded"):
        mm(ids, mask=mx.array([[True, False, True, True]]))
    with pytest.raises(HNetError, match="cu_seqlens"):
        mm(mx.array([encode("abcd")]), cu_seqlens=mx.array([0, 2, 3]))
