"""Training-checkpoint layout and rotation (framework-free; the trainers fill in the files).

    OUT/
      train_config.json        settings of the run (read back on --resume)
      metrics.jsonl            one line per log step / eval
      checkpoints/step_00001000/
        config.json            \\ a plain model directory: `hnet generate --model` and
        model.safetensors      /  hnet_torch.load_pretrained / hnet_mlx.load read it directly
        optimizer.safetensors  AdamW moments, named by parameter
        trainer_state.json     step, data position, RNG states, backend, world size
      model/                   the final weights (a model directory), written when training ends

A checkpoint directory is written under a temporary name and renamed into place (io.atomic_path),
so a run cut off mid-write leaves the previous checkpoints untouched; `trainer_state.json` is
written last, and only directories holding it count as checkpoints. It records each file's size,
so `--resume` passes over a checkpoint damaged afterwards and takes the newest intact one. After each save the oldest are deleted so
that `keep_last` remain.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Callable

from . import io
from .errors import HNetError

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAIN_CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
FINAL_MODEL = "model"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(out: str, step: int) -> str:
    return os.path.join(out, CHECKPOINTS, f"step_{step:08d}")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, STATE_NAME)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def checkpoint_problem(path: str) -> str | None:
    """Why checkpoint `path` cannot be resumed from (a file missing, truncated or unreadable), or None.

    Checkpoints are renamed into place complete, so this catches damage done after the fact (a
    disk error, a copy cut short, a hand edit) before loading it half-way."""
    try:
        with open(os.path.join(path, STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
        # Checkpoints written before sizes were recorded: check what is there.
        sizes = state.get("files") or {n: None for n in os.listdir(path) if n.endswith((".safetensors", ".json"))}
        for name in sorted(sizes):
            file = os.path.join(path, name)
            if not os.path.exists(file):
                return f"{name} is missing"
            if sizes[name] is not None and os.path.getsize(file) != sizes[name]:
                return f"{name} has {os.path.getsize(file)} bytes, {sizes[name]} were written"
            if name.endswith(".safetensors"):
                io.read_safetensors_header(file)
            elif name.endswith(".json"):
                with open(file, encoding="utf-8") as f:
                    json.load(f)
    except (OSError, ValueError, AttributeError, HNetError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def resolve_resume(out: str, resume: str) -> str | None:
    """`--resume` (latest in OUT) or `--resume PATH` (a checkpoint directory) -> checkpoint directory.

    Plain `--resume` takes the newest checkpoint that is intact (saying which damaged ones it passed
    over), and None where the run was stopped before its first checkpoint (it starts again)."""
    if resume in ("", "latest"):
        found = list_checkpoints(out)
        for _, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"skipping damaged checkpoint {path} ({problem})", file=sys.stderr, flush=True)
        if found:
            raise HNetError(f"--resume: every checkpoint in {os.path.join(out, CHECKPOINTS)} is damaged; "
                            f"start again without --resume in a new --out")
        if os.path.exists(os.path.join(out, TRAIN_CONFIG_NAME)):
            return None
        raise HNetError(f"--resume: no checkpoint found in {os.path.join(out, CHECKPOINTS)}; start without --resume")
    if not os.path.exists(os.path.join(resume, STATE_NAME)):
        raise HNetError(f"--resume {resume} is not a training checkpoint (no {STATE_NAME}); "
                        f"pass a directory like {step_dir(out, 1000)} or plain --resume for the latest")
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise HNetError(f"--resume {resume}: the checkpoint is damaged ({problem}); pass an older one "
                        f"or plain --resume for the newest intact one")
    return resume


def write_checkpoint(out: str, step: int, fill: Callable[[str], dict], keep_last: int) -> str:
    """Create checkpoint `step` atomically: fill(tmp_dir) writes the files and returns trainer state.

    The state records every file's size, so a checkpoint damaged later is recognised (checkpoint_problem)."""
    path = step_dir(out, step)
    with io.atomic_directory(path, force=True, what="checkpoint") as tmp:
        state = fill(tmp)
        state["files"] = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        io.atomic_write_text(os.path.join(tmp, STATE_NAME), json.dumps(state, indent=1) + "\n")
    rotate(out, keep_last)
    return path


def clean_run_directory(out: str) -> None:
    """Remove the temporaries a killed earlier session of this run left (half-written checkpoints,
    a half-written final model)."""
    io.clean_temporaries(out)
    io.clean_temporaries(os.path.join(out, CHECKPOINTS))


def rotate(out: str, keep_last: int) -> None:
    for _, path in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: str) -> dict:
    state_path = os.path.join(path, STATE_NAME)
    try:
        with open(state_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HNetError(f"cannot read checkpoint state {state_path}: {e}") from None


def is_run_dir(path: str) -> bool:
    """A directory written by `train` / `finetune --out` (not itself a model directory)."""
    return os.path.isdir(path) and not io.is_model_dir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in (TRAIN_CONFIG_NAME, CHECKPOINTS, FINAL_MODEL))


def resolve_model_path(path: str | os.PathLike, announce: Callable[[str], None] | None = None) -> str:
    """The model directory to load for `--model PATH`, shared by every loader and CLI.

    A run directory (what `train` / `finetune --out` wrote) stands for its final model (`model/`), or,
    while training has not finished, its newest checkpoint's weights; which one was taken is
    announced (default: one line on stderr). Anything else is returned unchanged for the loader to
    judge (a model directory, a .pt checkpoint, a Hugging Face repo id, an ONNX export).
    """
    path = os.fspath(path)
    if not is_run_dir(path):
        return path
    say = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    final = os.path.join(path, FINAL_MODEL)
    if io.is_model_dir(final):
        say(f"using the final model of run {path}: {final}")
        return final
    latest = latest_checkpoint(path)
    if latest is not None and io.is_model_dir(latest):
        say(f"using the newest checkpoint of run {path} (no final model yet): {latest}")
        return latest
    raise HNetError(f"{path} is a training run directory with no final model ({FINAL_MODEL}/) and no complete "
                    f"checkpoint yet; train longer or pass a model directory")
