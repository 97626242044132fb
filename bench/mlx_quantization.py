"""How far MLX quantization (`hnet convert torch-to-mlx -q`) moves an H-Net's outputs from fp32.

    python -m bench.mlx_quantization

Models: the official fixture (official init + noise) and the 1-/2-stage test configs (random
weights with routing noise). Input: the fixture README's TEXT (334 bytes). For each of 8/4 bits
and group sizes 32/64 it prints the number of quantized layers, the file size, the max and relative
L2 logit error, the mean KL(fp32 || quantized) of the next-byte distributions, and the share of
stage-0 boundary decisions that flip (inner stages: their boundary rate, fp32 -> quantized).
Random small models are a harsh case: trained weights usually quantize better.
"""

from __future__ import annotations

import os
import tempfile

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import hnet_mlx
from hnet_core.tokenizer import encode
from hnet_mlx.convert import torch_to_mlx
from tests.conftest import FIXTURE_DIR, config_1stage, config_2stage, random_torch_model

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the top, he could see the "
        "fishing boats returning to the harbor, their lanterns flickering like small stars on the dark water. He wrote "
        "each name in a worn leather notebook, and when the last boat was safely home, he closed the book and lit the "
        "great lamp.")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main() -> None:
    import hnet_torch

    work = tempfile.mkdtemp()
    sources = {"fixture (1-stage)": (f"{FIXTURE_DIR}/model.pt", f"{FIXTURE_DIR}/config.json")}
    for name, make in (("test 1-stage", config_1stage), ("test 2-stage", config_2stage)):
        path = os.path.join(work, name.replace(" ", "_"))
        hnet_torch.save_pretrained(random_torch_model(make()), path)
        sources[name] = (path, None)
    ids = mx.array([encode(TEXT)])
    print(f"MLX {mx.__version__} affine quantization vs fp32, input: {ids.shape[1]} bytes")
    print("| model | bits | group | quantized layers | size (fp32 size) | max abs dlogit | rel L2 dlogit | mean KL |"
          " stage-0 boundary flips (inner stages: boundary rate) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (src, cfg) in sources.items():
        ref_dir = os.path.join(work, "ref")
        ref_summary = torch_to_mlx(src, ref_dir, config=cfg, force=True)
        ref, _ = hnet_mlx.load(ref_dir)
        out_r = ref(ids)
        lr = np.array(out_r.logits)
        for bits in (8, 4):
            for group in (32, 64):
                dst = os.path.join(work, "q")
                summary = torch_to_mlx(src, dst, config=cfg, quantize=True, q_bits=bits, q_group_size=group, force=True)
                model, _ = hnet_mlx.load(dst)
                out_q = model(ids)
                lq = np.array(out_q.logits)
                layers = sum(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))
                kl = (softmax(lr) * (np.log(softmax(lr)) - np.log(softmax(lq)))).sum(-1).mean()
                # Stage 0 sees the same bytes in both runs, so its decisions compare one by one; a flip
                # shifts every later inner position, so inner stages compare as boundary rates.
                flips = [f"{(np.array(out_r.routing[0].boundary_mask) != np.array(out_q.routing[0].boundary_mask)).mean():.1%}"]
                for a, b in zip(out_r.routing[1:], out_q.routing[1:]):
                    rate = [float(np.array(r.boundary_mask)[np.array(r.valid)].mean()) for r in (a, b)]
                    flips.append(f"rate {rate[0]:.2f}->{rate[1]:.2f}")
                print(f"| {name} | {bits} | {group} | {layers} | {summary.disk_bytes / 1e6:.2f} MB "
                      f"({ref_summary.disk_bytes / 1e6:.2f} MB) | {np.abs(lq - lr).max():.2e} | "
                      f"{np.linalg.norm(lq - lr) / np.linalg.norm(lr):.2e} | {kl:.1e} | {', '.join(flips)} |", flush=True)


if __name__ == "__main__":
    main()
