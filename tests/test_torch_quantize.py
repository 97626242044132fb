"""`--quantize int8` for the torch backend (hnet_torch/quantize.py): which layers turn int8, that the
quantized model still computes the same model (logits close, generation and steps work), and that
every wrong use is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from conftest import config_2stage, random_torch_model  # noqa: E402
from hnet_core.cli import main as hnet_main  # noqa: E402
from hnet_core.errors import HNetError  # noqa: E402
from hnet_torch.generate import generate  # noqa: E402
from hnet_torch.quantize import KEEP_FLOAT, quantize_int8, quantized_layers  # noqa: E402

TEXT = b"It is a truth universally acknowledged, that a single man in possession of a good fortune"


def test_int8_quantizes_every_linear_but_routing_head_and_residual_projections():
    model = random_torch_model(config_2stage(), seed=1)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    chosen = quantized_layers(model)
    assert chosen and chosen < linear
    assert all(any(k in n for k in KEEP_FLOAT) for n in linear - chosen)
    assert any("routing_module.q_proj_layer" in n for n in linear - chosen) and "lm_head" in linear - chosen
    quantize_int8(model)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], torch.ao.nn.quantized.dynamic.Linear) for n in chosen)
    assert all(type(modules[n]) is torch.nn.Linear for n in linear - chosen)


def test_int8_logits_stay_close_to_float32_and_decoding_runs():
    model = random_torch_model(config_2stage(), seed=1).eval()
    ids = torch.tensor([list(TEXT[:48]), list(TEXT[30:78])])
    with torch.inference_mode():
        want = model(ids).logits
        quantize_int8(model)
        got = model(ids).logits
    # int8 weights and activations: close, not equal (a scale of the logits' spread).
    assert (got - want).abs().max() <= 0.2 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    texts = generate(model, ["It is a truth", "The spiral"], max_tokens=24, temperature=0)  # cache + step path
    assert len(texts) == 2 and all(len(t.encode("utf-8", "replace")) > 0 for t in texts)


def test_int8_refuses_half_precision_weights_in_one_line():
    model = random_torch_model(config_2stage(), seed=1).to(torch.bfloat16)
    with pytest.raises(HNetError, match="float32 models on the CPU"):
        quantize_int8(model)


def test_generate_and_eval_take_quantize_int8_and_other_backends_refuse_it(tmp_path):
    runner = CliRunner()
    out = runner.invoke(hnet_main, ["generate", "--quantize", "int8", "--prompt", "It is", "--max-tokens", "8",
                                    "--temperature", "0"])
    assert out.exit_code == 0 and out.output, out.output
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT * 8)
    report = runner.invoke(hnet_main, ["eval", "--quantize", "int8", "--data", str(data), "--json"])
    assert report.exit_code == 0, report.output
    assert np.isfinite(json.loads(report.output.strip().splitlines()[-1])["bits_per_byte"])
    refused = runner.invoke(hnet_main, ["generate", "--backend", "mlx", "--quantize", "int8", "--prompt", "x"])
    assert refused.exit_code == 1 and "hnet convert torch-to-mlx -q" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and "Traceback" not in refused.output
