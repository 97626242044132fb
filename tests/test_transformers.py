"""H-Net through Hugging Face transformers (remote code -> hnet_torch/hf_model.py): loading, logits,
loss and Trainer, generate on our live cache, pipeline, save/load round trips and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

# offline: every model, tokenizer and data file here is local (read before transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hnet_core import mlx_lm_files  # noqa: E402
from hnet_core.errors import HNetError  # noqa: E402
from hnet_torch import generate as hnet_generate  # noqa: E402
from hnet_torch import load_pretrained, save_pretrained  # noqa: E402

from conftest import FIXTURE_DIR  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "hnet_core", "demo_model")
PROMPTS = ["The history of", "A", "Once upon a time, in a small village"]


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True)
    return model, tokenizer, load_pretrained(DEMO)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """The official fixture written as one of our model directories."""
    out = str(tmp_path_factory.mktemp("official") / "model")
    save_pretrained(load_pretrained(FIXTURE_DIR), out)
    return out


def test_auto_model_holds_exactly_load_pretrained_weights_in_fp32_and_bf16(demo):
    model, _, ref = demo
    assert isinstance(model, transformers.PreTrainedModel) and isinstance(model, transformers.GenerationMixin)
    bf16 = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.bfloat16)
    ref_bf16 = load_pretrained(DEMO, dtype="bfloat16")
    for got, want in ((model, ref), (bf16, ref_bf16)):
        a, b = got.state_dict(), want.state_dict()
        assert sorted(a) == sorted(b)
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert bf16.embeddings.weight.dtype == torch.bfloat16
    assert any(p.dtype == torch.float32 for n, p in bf16.named_parameters() if "residual_proj" in n)


def test_auto_tokenizer_is_the_byte_tokenizer(demo):
    _, tokenizer, _ = demo
    text = "héllo þ\n"
    assert tokenizer(text).input_ids == [254, *text.encode()]
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.pad_token_id == 255


def test_logits_equal_hnet_torch_with_left_or_right_padding(demo):
    model, tokenizer, ref = demo
    with torch.no_grad():
        alone = [ref(torch.tensor([[254, *p.encode()]])).logits[0] for p in PROMPTS]
        for side in ("left", "right"):
            enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side=side)
            logits = model(**enc).logits
            assert logits.shape == (3, enc.input_ids.shape[1], 256) and logits.dtype == torch.float32
            for row, want in enumerate(alone):
                valid = enc.attention_mask[row].bool()
                torch.testing.assert_close(logits[row][valid], want, rtol=1e-5, atol=1e-5)


def test_labels_give_shifted_cross_entropy(demo):
    model, tokenizer, _ = demo
    enc = tokenizer(["some text to score"], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, labels=enc.input_ids)
    logp = torch.log_softmax(out.logits[0, :-1], -1)
    want = -logp.gather(1, enc.input_ids[0, 1:, None]).mean()
    torch.testing.assert_close(out.loss, want)


def test_trainer_steps_reduce_the_loss(tmp_path):
    pytest.importorskip("accelerate")  # Trainer needs it (the transformers extra installs it)
    Dataset = pytest.importorskip("datasets").Dataset

    model = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True)
    text = "zebra quartz " * 6
    enc = tokenizer([text] * 4)
    data = Dataset.from_dict({"input_ids": enc.input_ids, "labels": enc.input_ids})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                                          learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True)
    with torch.no_grad():
        before = model(torch.tensor(enc.input_ids[:1]), labels=torch.tensor(enc.input_ids[:1])).loss.item()
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    with torch.no_grad():
        after = model(torch.tensor(enc.input_ids[:1]), labels=torch.tensor(enc.input_ids[:1])).loss.item()
    assert after < 0.8 * before


def _greedy(model, tokenizer, prompts, n):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return [bytes(row[enc.input_ids.shape[1]:].tolist()).decode("utf-8", "replace") for row in out]


def test_greedy_generate_equals_hnet_generate_batch_1_and_ragged_batch_3(demo):
    model, tokenizer, ref = demo
    want = hnet_generate(ref, PROMPTS, max_tokens=40, temperature=0)
    assert _greedy(model, tokenizer, PROMPTS, 40) == want
    assert _greedy(model, tokenizer, PROMPTS[:1], 40) == want[:1]


def test_greedy_generate_equals_the_hnet_generate_cli(demo):
    model, tokenizer, _ = demo
    cli = os.path.join(os.path.dirname(sys.executable), "hnet")
    out = subprocess.run([cli, "generate", "--model", DEMO, "-p", PROMPTS[2], "-m", "48", "--temperature", "0"],
                         capture_output=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert _greedy(model, tokenizer, PROMPTS[2:], 48)[0] == out.stdout.decode().rstrip("\n")


def test_generate_prefills_once_then_steps_one_byte(demo, monkeypatch):
    model, tokenizer, _ = demo
    core, calls = model.hnet, []
    forward, step = core.forward, core.step
    monkeypatch.setattr(core, "forward", lambda ids, **kw: calls.append(("forward", ids.shape[1])) or forward(ids, **kw))
    monkeypatch.setattr(core, "step", lambda ids, cache: calls.append(("step", ids.shape[1])) or step(ids, cache))
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert calls == [("forward", enc.input_ids.shape[1])] + [("step", 1)] * 9


def test_sampling_seed_eos_and_stop_strings(demo):
    model, tokenizer, _ = demo
    enc = tokenizer(["The"], return_tensors="pt")
    runs = []
    for _ in range(2):
        transformers.set_seed(3)
        runs.append(model.generate(**enc, max_new_tokens=20, do_sample=True, temperature=1.0).tolist())
    assert runs[0] == runs[1] and enc.input_ids.shape[1] < len(runs[0][0]) <= enc.input_ids.shape[1] + 20
    greedy = _greedy(model, tokenizer, ["The"], 30)[0]
    stop = greedy[5:8]
    out = model.generate(**enc, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    text = bytes(out[0, enc.input_ids.shape[1]:].tolist()).decode()
    assert text.endswith(stop) and greedy.startswith(text) and len(text) < 30
    eos = greedy.encode()[3]
    out = model.generate(**enc, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    assert out[0, enc.input_ids.shape[1]:].tolist() == list(greedy.encode()[:greedy.encode().index(eos) + 1])


def test_pipeline_text_generation(demo):
    _, _, ref = demo
    pipe = transformers.pipeline("text-generation", model=DEMO, trust_remote_code=True)
    out = pipe(PROMPTS[0], max_new_tokens=24, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == hnet_generate(ref, PROMPTS[0], max_tokens=24, temperature=0)


def test_save_pretrained_loads_in_transformers_hnet_torch_hnet_mlx_and_mlx_lm(demo, tmp_path):
    model, tokenizer, ref = demo
    out = str(tmp_path / "saved")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "hnet" and "auto_map" in config
    for name in ("configuration_hnet.py", "modeling_hnet.py", "hnet_mlx_lm.py"):
        assert os.path.exists(os.path.join(out, name)), name
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.tensor([[254, *b"round trip"]])
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(again(ids).logits, want)
        torch.testing.assert_close(load_pretrained(out)(ids).logits, want)
    mx = pytest.importorskip("mlx.core")
    import hnet_mlx
    import numpy as np

    mlx_lm = pytest.importorskip("mlx_lm")

    mlx_model = hnet_mlx.load_pretrained(out)
    np.testing.assert_allclose(np.array(mlx_model(mx.array(ids.numpy())).logits), want.numpy(), rtol=1e-3, atol=1e-3)
    lm, _ = mlx_lm.load(out, tokenizer_config={"trust_remote_code": True}, trust_remote_code=True)
    np.testing.assert_allclose(np.array(lm(mx.array(ids.numpy()))), want.numpy(), rtol=1e-3, atol=1e-3)


def test_official_fixture_dir_runs_in_transformers(official_dir):
    model = AutoModelForCausalLM.from_pretrained(official_dir, trust_remote_code=True)
    ref = load_pretrained(FIXTURE_DIR)
    ids = torch.tensor([[254, *b"official"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits.float())
    tokenizer = AutoTokenizer.from_pretrained(official_dir, trust_remote_code=True)
    assert _greedy(model, tokenizer, ["Hi"], 12) == [hnet_generate(ref, "Hi", max_tokens=12, temperature=0)]


# -- bad input ---------------------------------------------------------------------------------

def _copy_demo(tmp_path):
    out = str(tmp_path / "m")
    shutil.copytree(DEMO, out)
    return out


def test_a_directory_without_a_model_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hnet"}))
    with pytest.raises(HNetError, match="not an H-Net model directory"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True)


def test_wrong_model_type_is_one_clear_error(tmp_path):
    out = _copy_demo(tmp_path)
    config = json.load(open(os.path.join(out, "config.json")))
    json.dump({**config, "model_type": "llama"}, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(HNetError, match="model_type 'llama'"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_weights_that_do_not_match_the_config_are_one_clear_error(tmp_path):
    out = _copy_demo(tmp_path)
    config = json.load(open(os.path.join(out, "config.json")))
    config["d_model"] = [128, 192, 320]
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(HNetError, match="does not match the weights|is the config right for these weights"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_trust_remote_code_false_is_refused_with_the_reason(tmp_path):
    code = ("import transformers, sys\n"
            "try:\n    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False)\n"
            "except ValueError as e:\n    print('REFUSED', 'trust_remote_code=True' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code, DEMO], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "REFUSED True" in out.stdout


def test_input_longer_than_the_configured_limit_is_one_clear_error(tmp_path, demo):
    _, tokenizer, _ = demo
    out = _copy_demo(tmp_path)
    config = json.load(open(os.path.join(out, "config.json")))
    json.dump({**config, "max_position_embeddings": 16}, open(os.path.join(out, "config.json"), "w"))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    enc = tokenizer(["x" * 20], return_tensors="pt")
    with pytest.raises(HNetError, match="exceed this model's max_position_embeddings 16"):
        model(**enc)
    with pytest.raises(HNetError, match="max_position_embeddings 16"):
        model.generate(**tokenizer(["x" * 10], return_tensors="pt"), max_new_tokens=10, do_sample=False)


def test_beam_search_is_refused_in_one_line(demo):
    model, tokenizer, _ = demo
    with pytest.raises(HNetError, match="beam search is not supported"):
        model.generate(**tokenizer(["The"], return_tensors="pt"), max_new_tokens=4, num_beams=2, do_sample=False)


def test_add_mlx_lm_makes_an_older_directory_a_transformers_one(tmp_path, demo):
    _, _, ref = demo
    out = str(tmp_path / "old")
    os.makedirs(out)
    shutil.copy(os.path.join(DEMO, "model.safetensors"), out)
    config = json.load(open(os.path.join(DEMO, "config.json")))
    old = {k: v for k, v in config.items() if k not in mlx_lm_files.CONFIG_KEYS}  # as written before any ecosystem keys
    json.dump(old, open(os.path.join(out, "config.json"), "w"))
    cli = os.path.join(os.path.dirname(sys.executable), "hnet-mlx")
    subprocess.run([cli, "add-mlx-lm", out], check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.tensor([[254, *b"upgraded"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_bf16_greedy_generate_equals_hnet_generate_in_bf16(demo):
    _, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.bfloat16)
    want = hnet_generate(load_pretrained(DEMO, dtype="bfloat16"), PROMPTS, max_tokens=24, temperature=0)
    assert _greedy(model, tokenizer, PROMPTS, 24) == want
