"""Ship a finished training run as the bundled model: float16 weights in our torch-layout directory
(which every backend loads) and a MODEL_CARD.md whose figures are measured here, not typed in.

    python -m bench.quality.ship --run runs/bundled_decay --notes bench/quality/bundled_notes.md \
        --out hnet_core/demo_model

The card holds: parameters per stage, training steps, bytes seen, wall time (the sum of the run's
sessions, from metrics.jsonl), bits per byte on every held-out set beside xz -9e / zstd -22 / bzip2 -9
on exactly the scored bytes, bytes per chunk per stage, how often chunk starts fall at word starts, a
greedy and a sampled continuation of plain English prompts, and `--notes` (data, licences, the exact
commands) as written by hand. It also draws bench/quality/chunks.png (the sample paragraph's chunks)
and writes bench/quality/bundled_eval.json (every figure of the card).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

from . import quality  # held-out sets, evaluate_model

HERE = os.path.dirname(os.path.abspath(__file__))

PROMPTS = ("The old lighthouse keeper", "It was the first day of spring, and", "The purpose of this chapter is")


def parameters_per_stage(state: dict, num_stages: int) -> list[tuple[str, int]]:
    """Parameters of each level: embeddings + LM head, then level k's encoder, routing and decoder
    (keys under backbone.main_network^k but not under the next level), the innermost main network."""
    rows = [("embedding + LM head", sum(v.numel() for k, v in state.items() if not k.startswith("backbone.")))]
    for level in range(num_stages + 1):
        prefix = "backbone." + "main_network." * level
        # the innermost level's isotropic stack is itself called main_network: it all belongs to that level
        inner = prefix + "main_network." if level < num_stages else None
        n = sum(v.numel() for k, v in state.items() if k.startswith(prefix) and not (inner and k.startswith(inner)))
        rows.append((f"level {level}" + (" (main network)" if level == num_stages else " (encoder, routing, decoder)"), n))
    return rows


def training_summary(run: str) -> dict:
    from hnet_core.metrics import read_metrics

    records = read_metrics(os.path.join(run, "metrics.jsonl"))
    train = [r for r in records if r["kind"] == "train"]
    settings = json.load(open(os.path.join(run, "train_config.json")))
    # `elapsed` restarts at every session (a resume): add up each session's last value.
    wall, last = 0.0, 0.0
    for r in train:
        if r["elapsed"] < last:
            wall += last
        last = r["elapsed"]
    wall += last
    step = train[-1]["step"]
    evals = [r for r in records if r["kind"] == "eval"]
    return {"steps": step, "bytes": step * settings["batch_size"] * settings["seq_len"], "wall_s": wall,
            "settings": settings, "last_val_bpb": evals[-1]["bpb"] if evals else None}


def continuation(model: str, prompt: str, temperature: float) -> str:
    cmd = ["hnet", "generate", "--model", model, "--prompt", prompt, "--max-tokens", "300",
           "--temperature", str(temperature), "--seed", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if out.returncode != 0:
        raise SystemExit(f"hnet generate failed: {out.stderr.strip()[-300:]}")
    return out.stdout


def training_vocabulary(train_dir: str, min_count: int = 3) -> set[str]:
    """Lower-cased letter runs seen at least `min_count` times in the training text: the yardstick for
    "real English words" in the continuations (names and archaic spellings of the corpora count too)."""
    import re
    from collections import Counter

    counts: Counter = Counter()
    for name in sorted(os.listdir(train_dir)):
        with open(os.path.join(train_dir, name), "rb") as f:
            counts.update(w.lower() for w in re.findall(rb"[A-Za-z]+", f.read()))
    return {w.decode() for w, n in counts.items() if n >= min_count}


def known_words(text: str, vocabulary: set[str]) -> tuple[int, int]:
    """(words of `text` in `vocabulary`, all words): letter runs, the last one dropped if the text ends
    inside it (generation stops at a byte count, mid-word)."""
    import re

    words = re.findall(r"[A-Za-z]+", text)
    if words and text and text[-1].isalpha():
        words = words[:-1]
    return sum(w.lower() in vocabulary for w in words), len(words)


def card(notes: str, ev: dict, summary: dict, stages: list, samples: list, vocabulary: set[str]) -> str:
    s = summary["settings"]
    lines = ["# The bundled model: a 2-stage H-Net trained on English prose and documentation", "",
             "The model every command uses when no `--model` is given (`hnet generate`, `hnet-mlx generate`, "
             "`hnet eval`, `hnet-mlx chunks`, `hnet export onnx`). Float16 safetensors in our torch-layout "
             "directory format; `hnet_torch.load_pretrained` and `hnet_mlx.load` read it (upcast to float32 by "
             "default). Every figure below was measured by `bench/quality/ship.py` on these shipped weights.", "",
             "## Architecture", "", f"`config.json`: layout `{json.dumps(ev['config']['arch_layout'])}`, d_model "
             f"{ev['config']['d_model']}, d_intermediate {ev['config']['d_intermediate']}, "
             f"{ev['parameters']:,} parameters:", "", "| part | parameters |", "|---|---:|"]
    lines += [f"| {name} | {n:,} |" for name, n in stages]
    lines += ["", "## Training", "",
              f"- {summary['steps']:,} optimizer steps of {s['batch_size']} x {s['seq_len']} bytes (packed): "
              f"**{summary['bytes'] / 1e6:.1f}M bytes seen**.",
              f"- Wall time: {summary['wall_s'] / 3600:.2f} h over several sessions on this project's 2-core "
              "x86_64 CPU (hnet_torch, float32, 2 threads), often shared with other jobs.",
              f"- AdamW, lr {s['lr']} with {s['warmup']} warmup steps, schedule `{s['schedule']}` (decay over the "
              f"last {s.get('decay_fraction')} of the steps), ratio-loss weight {s.get('alpha')}, target bytes "
              f"per chunk {s.get('target_ratios') or 'the default, 3 per stage'}.", "", notes.strip(), "",
              "## Held-out evaluation", "",
              "Bits per byte of `hnet eval` (windows of 1024 bytes advancing by 512, every byte scored once) on "
              "text never trained on, beside general-purpose compressors on exactly the same bytes "
              "(`python -m bench.quality.quality evaluate --model hnet_core/demo_model`):", "",
              "| held-out set | bytes | this model | xz -9e | zstd --ultra -22 | bzip2 -9 | vs best of xz/bzip2 | "
              "bytes per stage-0 / stage-1 chunk |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in ev["sets"].items():
        best = min(e["xz -9e"], e["bzip2 -9"])
        bpc = " / ".join(f"{c:.2f}" for c in (e.get("bytes_per_chunk") or []))
        lines.append(f"| {name} | {e['bytes']:,} | **{e['bits_per_byte']:.3f}** | {e['xz -9e']:.3f} | "
                     f"{e['zstd --ultra -22']:.3f} | {e['bzip2 -9']:.3f} | {100 * (e['bits_per_byte'] / best - 1):+.1f}% | {bpc} |")
    lines += ["", "Where chunks start, first 60 KB of each set (`word_start_stats` in quality.py): at a word start (a "
              "byte after whitespace or ASCII punctuation) and, to check the other reading of a boundary, at a "
              "word's last byte (the next byte is a separator) and on a separator itself (a chunk that reads "
              "\" word\", the space leading). Chance is the share of all bytes of that kind:", "",
              "| held-out set | at word starts: stage 0 | stage 1 | chance | at word ends: stage 0 | stage 1 | "
              "chance | at separators: stage 0 | stage 1 | chance |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in ev["sets"].items():
        w = e.get("word_starts")
        if w:
            starts, ends, seps = w["boundary_at_word_start"], w["boundary_at_word_end"], w["boundary_at_separator"]
            lines.append(f"| {name} | {starts[0]:.2f} | {starts[1]:.2f} | {w['chance']:.2f} | {ends[0]:.2f} | "
                         f"{ends[1]:.2f} | {w['chance_word_end']:.2f} | {seps[0]:.2f} | {seps[1]:.2f} | "
                         f"{w['chance_separator']:.2f} |")
    lines += ["", "## Continuations", "", "300 bytes each, `hnet generate --model hnet_core/demo_model --prompt P "
              "--max-tokens 300 --temperature T --seed 0`. Real words: the continuation's letter runs that occur "
              "at least 3 times in the training text (case ignored; a word cut off by the byte limit is not "
              "counted).", ""]
    totals = [0, 0]
    for prompt, temperature, text in samples:
        known, words = known_words(text, vocabulary)
        totals = [totals[0] + known, totals[1] + words]
        shown = text.replace("\r", "").replace("```", "'''")
        lines += [f"**{prompt!r}, temperature {temperature}** (real words: {known} of {words}):", "", "```text",
                  shown.rstrip(), "```", ""]
    lines += [f"All continuations: {totals[0]} of {totals[1]} words are real words "
              f"({100 * totals[0] / max(totals[1], 1):.0f}%).", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="training run directory with model/ and metrics.jsonl")
    ap.add_argument("--notes", required=True, help="markdown: data, licences and the exact commands")
    ap.add_argument("--out", default=os.path.join(quality.REPO, "hnet_core", "demo_model"))
    ap.add_argument("--limit", type=int, default=None, help="score only the first N bytes of each set")
    args = ap.parse_args()
    import torch

    from hnet_torch import load_pretrained, save_pretrained

    model = load_pretrained(os.path.join(args.run, "model")).float()
    save_pretrained(model.to(torch.float16), args.out, force=True)
    ev = quality.evaluate_model(args.out, args.limit)
    ev["config"] = json.load(open(os.path.join(args.out, "config.json")))
    stages = parameters_per_stage(model.state_dict(), model.config.num_stages)
    summary = training_summary(args.run)
    samples = [(p, t, continuation(args.out, p, t)) for p in PROMPTS for t in (0.0, 0.8)]
    vocabulary = training_vocabulary(os.path.join(quality.DATA, "train"))
    text = card(open(args.notes).read(), ev, summary, stages, samples, vocabulary)
    tmp = os.path.join(args.out, "MODEL_CARD.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(args.out, "MODEL_CARD.md"))
    quality.plot_chunks(args.out, quality.SAMPLE, os.path.join(HERE, "chunks.png"))
    with open(os.path.join(HERE, "bundled_eval.json"), "w") as f:
        json.dump({"evaluation": ev, "training": {k: v for k, v in summary.items() if k != "settings"}}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
