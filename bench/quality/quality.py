"""Does dynamic chunking pay off at small scale? The bundled model's data, and a same-compute comparison.

    python -m bench.quality.quality prepare                 # split ../shared/data into train/ and heldout/
    python -m bench.quality.quality flops                   # FLOPs per byte of the three configs (counted)
    python -m bench.quality.quality train --steps 2000      # the three models, same bytes (resumable)
    python -m bench.quality.quality report                  # results.md/json, curves.png, chunks_comparison_2stage.png
    python -m bench.quality.quality evaluate --model DIR    # one model on every held-out set (model card)

Data (`prepare`): the English corpora of ../shared/data (see its README for provenance and licences):
Austen, Brown (detagged), Shakespeare, the Linux and Python documentation. The last 300 KB of each
(cut at a line start; for the Python docs, the last 300 KB before their index pages) is held out; the
Linux and Python docs contribute their first 8 MB / 6 MB to
training (prose should dominate). Every 4th block of 64 KB of training text is written with CRLF line ends
(`with_some_crlf`: the Canterbury texts use them; the training corpora do not); held-out text is unchanged. The Canterbury texts (alice29, asyoulik, lcet10, plrabn12 as
`canterbury_text4`) are never trained on and are scored as one more held-out set.

The comparison (`train`, `report`) trains three models with the same trainer, data order, steps,
batch and schedule, so they see the same training bytes:
- `hnet_2stage`: the bundled model's recipe (bench/quality/configs/hnet_2stage.json),
- `hnet_1stage`: one chunking stage with a bigger main network,
- `isotropic`: no chunking, a byte-level stack of the main network's layer types (Transformer layers with
  a Mamba2 layer at each end, as the H-Net's outer levels), sized to the 2-stage model's FLOPs per byte.
FLOPs per byte are counted, not estimated: torch's FlopCounterMode over forward + backward of real
training batches (packed, 4 x 1024 bytes) of each trained model, at the compression it actually reached.
Scores are bits per byte of `hnet eval` (windows of 1024 bytes advancing by 512, every byte scored once)
on each held-out set, beside `xz -9e`, `zstd --ultra -22` and `bzip2 -9` compressing exactly the scored
bytes as one file. Word starts: a byte is a word start when the byte before it is whitespace or ASCII
punctuation; we report the fraction of each stage's chunk starts (lifted to bytes) that are word starts,
as the paper does, and the fraction that would be expected by chance (word starts / all bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
RUNS = os.path.join(REPO, "runs", "quality")
DATA = os.path.join(RUNS, "data")
MODELS = ("hnet_2stage", "hnet_1stage", "isotropic")
HELD_OUT_BYTES = 300_000
# name -> (file in ../shared/data, bytes of training text kept from its head; None = all but the held-out tail)
CORPORA = {
    "austen": ("austen.txt.xz", None),
    "brown": ("brown_detagged.txt.xz", None),
    "shakespeare": ("shakespeare_gut.txt.xz", None),
    "linux_docs": ("linux_docs_en.txt.xz", 8_000_000),
    "python_docs": ("python311_docs.info.txt.xz", 6_000_000),
}
EVAL_ONLY = {"canterbury_text4": "canterbury_text4.txt.xz"}
# Every CRLF_EVERY-th block of CRLF_BLOCK bytes (cut at line starts) of the training text gets CRLF line ends:
# the Canterbury texts (and much text in the wild) end lines with "\r\n", which our corpora never do, and a
# model that never saw "\r" pays ~10 bits for each one. Blocks of 64 KB keep most 1 KB windows in one style.
CRLF_BLOCK, CRLF_EVERY = 65_536, 4
TRAIN_FLAGS = ["--batch-size", "4", "--seq-len", "1024", "--lr", "2e-3", "--warmup", "200", "--schedule", "wsd",
               "--decay-fraction", "0.2", "--val-fraction", "0.01", "--eval-bytes", "65536"]
PUNCT = set(b" \t\n\r\f\v!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def xz_read(path: str) -> bytes:
    return subprocess.run(["xz", "-dc", path], capture_output=True, check=True).stdout


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- data -------------------------------------------------------------------------------------------


def with_some_crlf(text: bytes, block: int = CRLF_BLOCK, every: int = CRLF_EVERY) -> bytes:
    """`text` with every `every`-th block of about `block` bytes (cut after a newline) written with CRLF."""
    parts, start, index = [], 0, 0
    while start < len(text):
        end = text.find(b"\n", start + block)
        end = len(text) if end < 0 else end + 1
        piece = text[start:end]
        parts.append(piece.replace(b"\n", b"\r\n") if index % every == every - 1 else piece)
        start, index = end, index + 1
    return b"".join(parts)


def prepare(shared: str = SHARED, out: str = DATA) -> dict:
    """train/NAME.txt and heldout/NAME.txt per corpus; heldout/canterbury_text4.txt. Returns byte counts."""
    sizes = {}
    for name, (fname, keep) in CORPORA.items():
        text = xz_read(os.path.join(shared, fname))
        # The Python docs (an Info file) end with ~4 MB of index pages and a tag table (lists of names and
        # offsets, not text): the held-out tail is taken before the first index page.
        index = text.find(b"\x1f\nFile: python3.11.info,  Node: Python Module Index,")
        text = text[:index] if index > 0 else text
        cut = text.index(b"\n", len(text) - HELD_OUT_BYTES) + 1  # held-out tail starts at a line
        train, held = text[:cut], text[cut:]
        if keep is not None:
            train = train[:keep]
            train = train[: train.rindex(b"\n") + 1]
        train = with_some_crlf(train)
        write(os.path.join(out, "train", name + ".txt"), train)
        write(os.path.join(out, "heldout", name + ".txt"), held)
        sizes[name] = {"train": len(train), "heldout": len(held)}
    for name, fname in EVAL_ONLY.items():
        text = xz_read(os.path.join(shared, fname))
        write(os.path.join(out, "heldout", name + ".txt"), text)
        sizes[name] = {"train": 0, "heldout": len(text)}
    return sizes


def held_out_sets(data: str = DATA) -> list[str]:
    names = list(CORPORA) + list(EVAL_ONLY)
    return [os.path.join(data, "heldout", n + ".txt") for n in names]


def compressor_bpb(path: str, limit: int | None = None) -> dict:
    """Bits per byte of xz -9e, zstd --ultra -22 and bzip2 -9 on exactly the bytes scored."""
    data = open(path, "rb").read()[:limit]
    out = {}
    for name, cmd in (("xz -9e", ["xz", "-9e", "-c"]), ("zstd --ultra -22", ["zstd", "--ultra", "-22", "-c", "-q"]),
                      ("bzip2 -9", ["bzip2", "-9", "-c"])):
        packed = subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
        out[name] = 8 * len(packed) / len(data)
    return out


# -- counting -------------------------------------------------------------------------------------


def load_model(model_dir: str):
    from hnet_torch import load_pretrained

    model = load_pretrained(model_dir)
    return model.float().eval()


def training_batches(data: str, n: int, seed: int = 1):
    """n packed training batches (4 x 1024) as the trainer draws them."""
    from hnet_core.data import BatchSampler, load_tokens

    sampler = BatchSampler(load_tokens(os.path.join(data, "train")), 1024, 4, seed=seed)
    return [sampler.next_batch() for _ in range(n)]


def flops_per_byte(model, batches) -> dict:
    """Forward + backward FLOPs per input byte, counted by torch on real batches."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hnet_torch import hnet_loss

    total_flops, total_bytes, compression = 0, 0, []
    for batch in batches:
        ids = torch.as_tensor(batch.input_ids).long()
        cu = torch.as_tensor(batch.cu_seqlens).long() if batch.cu_seqlens is not None else None
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(ids, cu_seqlens=cu)
            loss = out.logits.float().logsumexp(-1).mean()  # the head's backward, as in training
            loss.backward()
        model.zero_grad(set_to_none=True)
        total_flops += counter.get_total_flops()
        total_bytes += ids.numel()
        compression.append([float(r.boundary_mask.numel()) / max(int(r.boundary_mask.sum()), 1) for r in out.routing])
    mean_comp = [sum(c[s] for c in compression) / len(compression) for s in range(len(compression[0]))] if compression[0] else []
    return {"flops_per_byte": total_flops / total_bytes, "compression": mean_comp}


def word_start_stats(model, path: str, limit: int = 60_000, window: int = 2048) -> dict:
    """Fraction of each stage's chunk starts (at bytes) that fall on a word start, and, as a check on
    an off-by-one convention, the fraction that fall on a word's last byte (the next byte is a
    separator): a boundary there hands the main network's output to the separator, the position
    that predicts the next word; and the fraction that fall on a separator byte itself (a chunk
    that reads " word", the space leading)."""
    import numpy as np
    import torch

    from hnet_core.chunks import byte_boundaries

    separator = np.zeros(256, dtype=bool)
    separator[list(PUNCT)] = True
    data = open(path, "rb").read()[:limit]
    hits, ends, seps, starts = None, None, None, None
    word_starts, word_ends, separators, total = 0, 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(data), window):
            piece = np.frombuffer(data[i : i + window], dtype=np.uint8)
            if len(piece) < 3:
                continue
            out = model(torch.tensor([[254, *piece.tolist()]]))
            at_bytes = byte_boundaries([r.boundary_mask[0].numpy() for r in out.routing])
            # position j + 1 of the model input is byte j of the piece; score bytes 1..n-2 (each has
            # a byte before and after it in the piece)
            j = np.arange(1, len(piece) - 1)
            is_word_start = separator[piece[j - 1]]
            is_word_end = separator[piece[j + 1]] & ~separator[piece[j]]
            is_separator = separator[piece[j]]
            if hits is None:
                hits, ends, seps, starts = ([0] * len(at_bytes) for _ in range(4))
            for s, b in enumerate(at_bytes):
                b = b[j + 1].astype(bool)
                hits[s] += int((b & is_word_start).sum())
                ends[s] += int((b & is_word_end).sum())
                seps[s] += int((b & is_separator).sum())
                starts[s] += int(b.sum())
            word_starts += int(is_word_start.sum())
            word_ends += int(is_word_end.sum())
            separators += int(is_separator.sum())
            total += len(j)
    return {"boundary_at_word_start": [h / max(n, 1) for h, n in zip(hits or [], starts or [])],
            "word_starts_covered": [h / max(word_starts, 1) for h in hits or []],
            "chance": word_starts / max(total, 1),
            "boundary_at_word_end": [e / max(n, 1) for e, n in zip(ends or [], starts or [])],
            "chance_word_end": word_ends / max(total, 1),
            "boundary_at_separator": [e / max(n, 1) for e, n in zip(seps or [], starts or [])],
            "chance_separator": separators / max(total, 1), "bytes": len(data)}


def eval_bpb(model_dir: str, path: str, limit: int | None = None) -> dict:
    cmd = ["hnet", "eval", "--backend", "torch", "--model", model_dir, "--data", path, "--json"]
    if limit:
        cmd += ["--max-bytes", str(limit)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"hnet eval failed on {path}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def evaluate_model(model_dir: str, limit: int | None = None, data: str = DATA) -> dict:
    model = load_model(model_dir)
    result = {"model": model_dir, "parameters": sum(p.numel() for p in model.parameters()), "sets": {}}
    for path in held_out_sets(data):
        name = os.path.basename(path)[:-4]
        report = eval_bpb(model_dir, path, limit)
        entry = {"bits_per_byte": report["bits_per_byte"], "bytes": report["bytes"],
                 "bytes_per_chunk": report.get("bytes_per_chunk"), **compressor_bpb(path, limit)}
        if model.config.num_stages:
            entry["word_starts"] = word_start_stats(model, path)
        result["sets"][name] = entry
        print(f"  {name}: {entry['bits_per_byte']:.3f} bpb", file=sys.stderr)
    return result


# -- training -------------------------------------------------------------------------------------


def run_dir(name: str) -> str:
    return os.path.join(RUNS, name)


def train(steps: int, threads: int | None, minutes: float | None) -> None:
    """Train each model for `steps` optimizer steps with identical flags (resumable: rerun to continue)."""
    for name in MODELS:
        out = run_dir(name)
        if os.path.isdir(os.path.join(out, "model")):
            continue
        resume = ["--resume"] if os.path.isdir(os.path.join(out, "checkpoints")) else []
        cmd = ["hnet", "train", "--config", os.path.join(HERE, "configs", name + ".json"), "--data",
               os.path.join(DATA, "train"), "--out", out, "--steps", str(steps), *TRAIN_FLAGS,
               "--save-every", "250", "--eval-every", str(max(steps // 10, 50)), "--log-every", "50", *resume]
        if threads:
            cmd += ["--threads", str(threads)]
        if minutes:
            cmd += ["--time-limit", str(minutes * 60)]
        print(" ".join(cmd), file=sys.stderr)
        t = time.time()
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"training {name} failed; rerun the same command to resume")
        print(f"{name}: {time.time() - t:.0f} s this session", file=sys.stderr)


def final_model(name: str) -> str | None:
    from hnet_core import checkpoint as ckpt

    out = run_dir(name)
    if os.path.isdir(os.path.join(out, "model")):
        return os.path.join(out, "model")
    return ckpt.latest_checkpoint(out) if os.path.isdir(os.path.join(out, "checkpoints")) else None


# -- pictures -------------------------------------------------------------------------------------


def plot_curves(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hnet_core.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in MODELS:
        metrics = os.path.join(run_dir(name), "metrics.jsonl")
        if not os.path.exists(metrics):
            continue
        evals = [r for r in read_metrics(metrics) if r["kind"] == "eval"]
        ax.plot([r["step"] * 4 * 1024 / 1e6 for r in evals], [r["bpb"] for r in evals], marker="o", label=name)
    ax.set_xlabel("training bytes (millions)")
    ax.set_ylabel("held-out bits per byte (validation split)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_chunks(model_dir: str, text: bytes, path: str) -> None:
    """The paragraph, each stage-0 chunk on a coloured box, stage-1 chunk starts underlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from hnet_core.chunks import PALETTE, byte_boundaries

    model = load_model(model_dir)
    with torch.no_grad():
        out = model(torch.tensor([[254, *text]]))
    bounds = [b[1:] for b in byte_boundaries([r.boundary_mask[0].numpy() for r in out.routing])]
    chars = text.decode("ascii", errors="replace")
    cols, x, y, colour = 80, 0, 0, -1
    rows = len(chars) // cols + 1
    fig, ax = plt.subplots(figsize=(12, 0.45 * rows + 0.6))
    ax.set_xlim(0, cols)
    ax.set_ylim(-rows + 0.4, 0.6)
    ax.axis("off")
    for i, c in enumerate(chars):
        if bounds[0][i]:
            colour += 1
        if c == "\n" or x >= cols:
            x, y = 0, y - 1
            if c == "\n":
                continue
        ax.add_patch(plt.Rectangle((x, y - 0.4), 1, 0.85, color=PALETTE[colour % len(PALETTE)], lw=0))
        ax.text(x + 0.5, y, c, ha="center", va="center", family="monospace", fontsize=9)
        if len(bounds) > 1 and bounds[1][i]:
            ax.plot([x, x], [y - 0.45, y + 0.45], color="#c0392b", lw=1.5)
        x += 1
    ax.set_title("stage-0 chunks (colours) and stage-1 chunk starts (red bars)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SAMPLE = (b"The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing "
          b"in the night could see its beam from miles away, and the sailors knew they were close to home.")


# -- report ---------------------------------------------------------------------------------------


def report(limit: int | None) -> dict:
    results = {"models": {}, "limit": limit}
    batches = training_batches(DATA, 2)
    for name in MODELS:
        model_dir = os.path.join(run_dir(name), "model")
        if not os.path.isdir(model_dir):
            print(f"{name}: training not finished, skipped", file=sys.stderr)
            continue
        print(f"{name}: {model_dir}", file=sys.stderr)
        # A finished model's scores are kept beside it (keyed by the weights' mtime and the limit), so
        # rerunning `report` after another model finishes evaluates only that one.
        cache = os.path.join(run_dir(name), "report_cache.json")
        key = [os.path.getmtime(os.path.join(model_dir, "model.safetensors")), limit]
        cached = json.load(open(cache)) if os.path.exists(cache) else {}
        if cached.get("key") == key:
            entry = cached["entry"]
        else:
            entry = evaluate_model(model_dir, limit)
            entry.update(flops_per_byte(load_model(model_dir), batches))
            with open(cache, "w") as f:
                json.dump({"key": key, "entry": entry}, f)
        settings = json.load(open(os.path.join(run_dir(name), "train_config.json")))
        entry["steps"] = settings["steps"]
        entry["training_bytes"] = settings["steps"] * settings["batch_size"] * settings["seq_len"]
        results["models"][name] = entry
    plot_curves(os.path.join(HERE, "curves.png"))
    # chunks.png shows the bundled model (ship.py draws it); the comparison's 2-stage model gets its own
    if "hnet_2stage" in results["models"]:
        plot_chunks(os.path.join(run_dir("hnet_2stage"), "model"), SAMPLE, os.path.join(HERE, "chunks_comparison_2stage.png"))
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return results


def mean_over_sets(stats: list[dict], per_stage: str, chance: str) -> str:
    """'a / b (c)': a word-start statistic per stage and its chance level, averaged over the held-out sets."""
    if not stats:
        return "-"
    stages = " / ".join(f"{sum(w[per_stage][s] for w in stats) / len(stats):.2f}" for s in range(len(stats[0][per_stage])))
    return f"{stages} ({sum(w[chance] for w in stats) / len(stats):.2f})"


def markdown(results: dict) -> str:
    models = results["models"]
    if not models:
        return "no trained models yet\n"
    sets = list(next(iter(models.values()))["sets"])
    lines = ["| held-out set | " + " | ".join(models) + " | xz -9e | zstd -22 | bzip2 -9 |",
             "|---" * (len(models) + 4) + "|"]
    for s in sets:
        first = next(iter(models.values()))["sets"][s]
        row = [f"{m['sets'][s]['bits_per_byte']:.3f}" for m in models.values()]
        row += [f"{first[k]:.3f}" for k in ("xz -9e", "zstd --ultra -22", "bzip2 -9")]
        lines.append(f"| {s} ({first['bytes']:,} B) | " + " | ".join(row) + " |")
    lines += ["", "| model | parameters | FLOPs/byte (fwd+bwd, counted) | training bytes | compression per stage (tokens per chunk, vs the level below) |"
              " boundaries at word starts per stage (chance) | at word ends (chance) |", "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        ws = [e.get("word_starts") for e in m["sets"].values() if e.get("word_starts")]
        starts = mean_over_sets(ws, "boundary_at_word_start", "chance")
        ends = mean_over_sets(ws, "boundary_at_word_end", "chance_word_end")
        bpc = " / ".join(f"{c:.2f}" for c in m.get("compression", [])) or "-"
        lines.append(f"| {name} | {m['parameters'] / 1e6:.2f}M | {m['flops_per_byte'] / 1e6:.1f}M | "
                     f"{m['training_bytes']:,} | {bpc} | {starts} | {ends} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("prepare", help="split ../shared/data into train/ and heldout/ under runs/quality/data")
    p = sub.add_parser("flops", help="counted FLOPs per byte of the three configs (trained models if present)")
    p = sub.add_parser("train", help="train the three models for the same steps (rerun to resume)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="stop each model's session after so many minutes")
    p = sub.add_parser("report", help="evaluate the trained models; write results.md/json and the PNGs")
    p.add_argument("--limit", type=int, default=None, help="score only the first N bytes of each held-out set")
    p = sub.add_parser("evaluate", help="one model on every held-out set, with compressors and word starts")
    p.add_argument("--model", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--chunks-png", default=None, help="also draw the sample paragraph's chunks to this PNG")
    args = parser.parse_args()
    if args.what == "prepare":
        print(json.dumps(prepare(), indent=1))
    elif args.what == "flops":
        from hnet_torch import HNetConfig, HNetForCausalLM

        batches = training_batches(DATA, 2)
        for name in MODELS:
            model_dir = final_model(name)
            if model_dir:
                model = load_model(model_dir)
            else:
                model = HNetForCausalLM(HNetConfig.from_json(os.path.join(HERE, "configs", name + ".json")))
                model.init_weights()
            r = flops_per_byte(model, batches)
            n = sum(p.numel() for p in model.parameters())
            print(f"{name}: {n / 1e6:.2f}M parameters, {r['flops_per_byte'] / 1e6:.2f}M FLOPs/byte at compression "
                  f"{[round(c, 2) for c in r['compression']]} ({'trained' if model_dir else 'untrained'})")
    elif args.what == "train":
        train(args.steps, args.threads, args.minutes)
    elif args.what == "report":
        report(args.limit)
    elif args.what == "evaluate":
        result = evaluate_model(args.model, args.limit)
        print(json.dumps(result, indent=1))
        if args.chunks_png:
            plot_chunks(args.model, SAMPLE, args.chunks_png)


if __name__ == "__main__":
    main()
