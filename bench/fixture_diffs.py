"""Max abs differences of hnet_torch from the official fixture, per case (fp32, CPU).

    python -m bench.fixture_diffs

The tests assert these stay within the fixture README's tolerances; this prints the actual values.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hnet_torch import load_pretrained
from tests.conftest import FIXTURE_DIR

CASES = ["single_L1", "single_L5", "single_L37", "single_L100", "masked_batch"]


def torch_diffs(exp) -> dict[str, float]:
    model = load_pretrained(FIXTURE_DIR)
    out: dict[str, float] = {}
    with torch.no_grad():
        for case in CASES:
            ids, mask = torch.from_numpy(exp[f"{case}.input_ids"]), torch.from_numpy(exp[f"{case}.mask"])
            o = model(ids, mask=mask)
            valid = exp[f"{case}.mask"]
            out[f"{case} logits"] = float(np.abs(o.logits.numpy() - exp[f"{case}.logits"])[valid].max())
            out[f"{case} boundary_prob"] = float(np.abs(o.routing[0].boundary_prob.numpy() - exp[f"{case}.stage0.boundary_prob"])[valid].max())
        o = model(torch.from_numpy(exp["packed.input_ids"]).reshape(1, -1), cu_seqlens=torch.from_numpy(exp["packed.cu_seqlens"]))
        out["packed logits"] = float(np.abs(o.logits.numpy().reshape(exp["packed.logits"].shape) - exp["packed.logits"]).max())
        for case, fed_key in (("gen", "gen.generated_ids"), ("gen_tf", "gen_tf.fed_ids")):
            prompt = torch.from_numpy(exp[f"{case}.prompt_ids"])
            cache = model.allocate_inference_cache(1, int(exp[f"{case}.max_seqlen"]))
            o = model(prompt, cache=cache)
            out[f"{case} prefill logits"] = float(np.abs(o.logits.numpy() - exp[f"{case}.prefill_logits"]).max())
            worst = 0.0
            for k, byte in enumerate(exp[fed_key]):
                s = model.step(torch.tensor([[int(byte)]]), cache)
                worst = max(worst, float(np.abs(s.logits[0, -1].numpy() - exp[f"{case}.step_logits"][k]).max()))
            out[f"{case} step logits"] = worst
    return out


def main() -> None:
    exp = np.load(os.path.join(FIXTURE_DIR, "expected.npz"), allow_pickle=False)
    print("| case | hnet_torch max abs diff |")
    print("|---|---|")
    for k, v in torch_diffs(exp).items():
        print(f"| {k} | {v:.2e} |")


if __name__ == "__main__":
    main()
