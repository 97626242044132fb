"""Fault injection: a run or a write cut off by SIGTERM, SIGKILL or a full disk loses nothing that was
complete, leaves no temporary, and resumes to the same weights.

The default run interrupts a few chosen moments; `pytest -m slow tests/test_faults.py -s` interrupts
training at 20 seeded random moments (and conversion and export at several) and prints the counts
("N interruptions, N recovered, 0 leftovers"). HNET_FAULT_DELAY_WRITE (hnet_core/io.py) widens each
write's window so a signal lands inside it deterministically.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hnet_core import checkpoint as ckpt
from hnet_core import io

from conftest import FIXTURE_DIR, tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO, "hnet_core", "demo_model")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
STEPS, SAVE_EVERY = 8, 3  # checkpoints at 3, 6 and 8, then model/
OUTERMOST = re.compile(r"^\.tmp-\d+-\w{8}-[^.]")  # not the temporary of a write nested in another's
WRITE_DELAY = 0.4  # seconds each outermost write pauses twice while its temporary exists


def temporaries(root) -> list[str]:
    """Every temporary of ours under `root` (or beside it)."""
    root = os.fspath(root)
    found = []
    for top in (root, os.path.dirname(root)):
        if not os.path.isdir(top):
            continue
        for path, dirs, files in os.walk(top):
            found += [os.path.join(path, n) for n in dirs + files if n.startswith((".tmp-", ".old-"))]
            dirs[:] = [d for d in dirs if not d.startswith((".tmp-", ".old-"))]  # not what is inside one
            if top != root:
                break  # beside it: one level only
    return sorted(set(found))


def hnet(*args) -> list[str]:
    return [sys.executable, "-m", "hnet_core.cli", *args]


def train_args(tmp_path, out) -> list[str]:
    cfg, data, _ = tiny_run(tmp_path)
    return [sys.executable, "-m", "hnet_torch.train", "--config", cfg, "--data", data, "--out", str(out),
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--batch-size", "2",
            "--seq-len", "32", "--log-every", "1", "--val-fraction", "0", "--lr", "3e-3", "--warmup", "2"]


def final_weights(out) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(out, "model", "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run(cmd, limit_bytes: int | None = None, **kw) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit if limit_bytes else None, **kw)


def interrupt(cmd, watch, sig, after: float, nth_write: int | None = None, env=None) -> subprocess.Popen:
    """Start `cmd`; send `sig` `after` seconds after the start, or after its `nth_write`-th temporary
    appears under `watch` (outermost writes pause WRITE_DELAY twice, so the signal lands inside)."""
    env = dict(env or ENV, HNET_FAULT_DELAY_WRITE=str(WRITE_DELAY))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if nth_write is not None:
        seen: set[str] = set()
        while proc.poll() is None and len(seen) < nth_write:
            seen |= {n for n in map(os.path.basename, temporaries(watch)) if OUTERMOST.match(n)}
            time.sleep(0.01)
    time.sleep(after)
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.output = proc.communicate(timeout=600)[0]
    return proc


class Tally:
    """The counts the slow tests print: interruptions, runs that recovered, temporaries left behind."""

    def __init__(self, what: str):
        self.what, self.interruptions, self.recovered, self.leftovers, self.notes = what, 0, 0, 0, []

    def report(self) -> str:
        line = (f"{self.what}: {self.interruptions} interruptions, {self.recovered} recovered, "
                f"{self.leftovers} leftovers")
        print("\n" + line + "".join(f"\n  {n}" for n in self.notes))
        return line


def interrupt_training_and_resume(tmp_path, name, reference, sig, after, nth_write, tally: Tally) -> None:
    """One trial: interrupt a run, then continue it as a user would (`--resume` once a run exists)."""
    out = tmp_path / name
    cmd = train_args(tmp_path, out)
    proc = interrupt(cmd, out, sig, after, nth_write)
    tally.interruptions += 1
    saved = [s for s, _ in ckpt.list_checkpoints(str(out))]
    left = temporaries(out)
    if sig == signal.SIGTERM and proc.returncode == 0:
        # The stop request finished the write under way: nothing may be left half-done.
        assert not left, (left, proc.output)
    resume = ["--resume"] if (out / ckpt.TRAIN_CONFIG_NAME).exists() else []
    done = run(cmd + resume)
    assert done.returncode == 0, (sig, after, nth_write, proc.output, done.stdout, done.stderr)
    assert "no checkpoint found" not in done.stderr, (saved, done.stderr)
    if saved and resume:
        assert "starting again from step 0" not in done.stderr
    leftovers = temporaries(out) + (left if sig == signal.SIGTERM and proc.returncode == 0 else [])
    tally.leftovers += len(leftovers)
    if same_weights(final_weights(out), reference) and not leftovers:
        tally.recovered += 1
    else:
        tally.notes.append(f"{name}: {signal.Signals(sig).name} after {after:.2f}s (write {nth_write}) "
                           f"saved {saved}, leftovers {leftovers}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """(weights, seconds, run directory) of an uninterrupted run of the trials' settings."""
    tmp = tmp_path_factory.mktemp("reference")
    t0 = time.perf_counter()
    done = run(train_args(tmp, tmp / "run"))
    assert done.returncode == 0, done.stderr
    assert not temporaries(tmp / "run")
    return final_weights(tmp / "run"), time.perf_counter() - t0, tmp / "run"


def stopped_at_step_8(tmp_path, reference_run):
    """A copy of the reference run as if it had been stopped right after checkpoint 8 (no model/ yet)."""
    out = tmp_path / "run"
    shutil.copytree(reference_run[2], out)
    shutil.rmtree(out / "model")
    return out, train_args(tmp_path, out)


# -- training -------------------------------------------------------------------------------------


def test_sigterm_during_the_final_checkpoint_finishes_the_run_and_exits_0(tmp_path, reference_run):
    """The issue's lost run: SIGTERM while the final checkpoint is written (write 4 of train_config.json,
    step 3, step 6, step 8, model/): the write and the final model complete, exit status 0."""
    out = tmp_path / "run"
    proc = interrupt(train_args(tmp_path, out), out, signal.SIGTERM, WRITE_DELAY / 2, nth_write=4)
    assert proc.returncode == 0, proc.output
    assert not temporaries(out), proc.output
    assert same_weights(final_weights(out), reference_run[0])
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [6, 8]


def test_sigkill_inside_a_checkpoint_write_resumes_bit_identically(tmp_path, reference_run):
    tally = Tally("training")
    interrupt_training_and_resume(tmp_path, "kill", reference_run[0], signal.SIGKILL, WRITE_DELAY / 2, 3, tally)
    assert (tally.interruptions, tally.recovered, tally.leftovers) == (1, 1, 0), tally.notes


def test_resume_passes_over_a_damaged_checkpoint_and_removes_leftovers(tmp_path, reference_run):
    out, cmd = stopped_at_step_8(tmp_path, reference_run)
    newest = ckpt.step_dir(str(out), 8)
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    assert ckpt.checkpoint_problem(newest) is not None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended: its temporaries are leftovers of a killed write
    (out / "checkpoints" / f".tmp-{pid}-abcd1234-step_00000009").mkdir()
    (out / f".tmp-{pid}-abcd1234-model").mkdir()
    done = run(cmd + ["--resume"])
    assert done.returncode == 0, done.stderr
    assert "removed 1 leftover temporary of an interrupted earlier write" in done.stderr
    assert f"skipping damaged checkpoint {newest} (model.safetensors has " in done.stderr
    assert f"resumed from {ckpt.step_dir(str(out), 6)} at step 6" in done.stderr
    assert not temporaries(out)
    assert same_weights(final_weights(out), reference_run[0])


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, reference_run):
    out, cmd = stopped_at_step_8(tmp_path, reference_run)
    shutil.rmtree(ckpt.step_dir(str(out), 8))
    kept = ckpt.step_dir(str(out), 6)
    done = run(cmd + ["--resume"], limit_bytes=os.path.getsize(os.path.join(kept, "model.safetensors")) // 2)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write checkpoint {ckpt.step_dir(str(out), 8)}: file too large; nothing was written "
        f"(free some space or choose another path)"), done.stderr
    assert "Traceback" not in done.stderr
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [6] and ckpt.checkpoint_problem(kept) is None
    assert not temporaries(out)


# -- conversion and export --------------------------------------------------------------------


def test_a_full_disk_during_a_conversion_is_one_line_and_writes_nothing(tmp_path):
    dst = tmp_path / "mlx"
    done = run(hnet("convert", "torch-to-mlx", DEMO_MODEL, str(dst)), limit_bytes=1 << 20)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"Error: cannot write output {dst}: "), done.stderr
    assert "nothing was written" in done.stderr and "Traceback" not in done.stderr
    assert not dst.exists() and not temporaries(dst)


def test_a_full_disk_during_an_export_is_one_line_and_writes_nothing(tmp_path, official_onnx_export):
    dst = tmp_path / "int8"
    done = run(hnet("export", "onnx", "--model", official_onnx_export, "--quantize", "int8", "--out", str(dst)),
               limit_bytes=1 << 16)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write output {dst}: file too large; nothing was written (free some space or choose "
        f"another path)"), done.stderr
    assert not dst.exists() and not temporaries(dst)


def complete_or_nothing(dst, reference_files: set[str]) -> bool:
    if not dst.exists():
        return True
    return {os.path.relpath(os.path.join(r, f), dst) for r, _, fs in os.walk(dst) for f in fs} == reference_files


def files_of(directory) -> set[str]:
    return {os.path.relpath(os.path.join(r, f), directory) for r, _, fs in os.walk(directory) for f in fs}


def test_sigterm_inside_a_conversion_or_export_write_leaves_nothing(tmp_path, official_onnx_export):
    for name, cmd in [("mlx", hnet("convert", "torch-to-mlx", DEMO_MODEL)),
                      ("int8", hnet("export", "onnx", "--model", official_onnx_export, "--quantize", "int8", "--out"))]:
        dst = tmp_path / name
        proc = interrupt(cmd + [str(dst)], dst, signal.SIGTERM, WRITE_DELAY / 2, nth_write=1)
        assert proc.returncode == 143, proc.output
        assert not dst.exists() and not temporaries(dst), proc.output


# -- the long tallies -------------------------------------------------------------------------


@pytest.mark.slow
def test_training_survives_20_random_interruptions(tmp_path, reference_run):
    """SIGTERM and SIGKILL alternately, half inside a chosen write, half at a moment drawn over a whole run."""
    weights, seconds, _ = reference_run
    rng = random.Random(27)
    tally = Tally("training")
    for trial in range(20):
        sig = signal.SIGTERM if trial % 2 == 0 else signal.SIGKILL
        if trial % 4 < 2:
            nth_write, after = rng.randint(1, 5), rng.uniform(0, 2 * WRITE_DELAY)
        else:
            nth_write, after = None, rng.uniform(0, seconds)
        interrupt_training_and_resume(tmp_path, f"trial{trial}", weights, sig, after, nth_write, tally)
    line = tally.report()
    assert (tally.recovered, tally.leftovers) == (20, 0), line


@pytest.mark.slow
def test_conversion_and_export_survive_random_sigterms(tmp_path, official_onnx_export):
    """Each command once uninterrupted (its files and duration), then SIGTERM at 5 random moments each."""
    rng = random.Random(27)
    tally = Tally("conversion and export")
    commands = {
        "convert": hnet("convert", "torch-to-mlx", DEMO_MODEL),
        "export": hnet("export", "onnx", "--model", os.path.join(FIXTURE_DIR, "model.pt"), "--config",
                       os.path.join(FIXTURE_DIR, "config.json"), "--no-batch-variants", "--out"),
    }
    for name, cmd in commands.items():
        t0 = time.perf_counter()
        full = tmp_path / f"{name}_full"
        assert run(cmd + [str(full)]).returncode == 0
        seconds, expected = time.perf_counter() - t0, files_of(full)
        for trial in range(5):
            dst = tmp_path / f"{name}{trial}"
            proc = interrupt(cmd + [str(dst)], dst, signal.SIGTERM, rng.uniform(0, seconds))
            tally.interruptions += 1
            left = temporaries(dst)
            tally.leftovers += len(left)
            if complete_or_nothing(dst, expected) and not left:
                tally.recovered += 1
            else:
                tally.notes.append(f"{name}{trial}: rc {proc.returncode}, files {sorted(files_of(dst))}, "
                                   f"leftovers {left}")
    line = tally.report()
    assert tally.recovered == tally.interruptions and tally.leftovers == 0, line


@pytest.mark.slow
def test_a_full_disk_during_a_traced_export_is_one_line(tmp_path):
    dst = tmp_path / "onnx"
    done = run(hnet("export", "onnx", "--model", os.path.join(FIXTURE_DIR, "model.pt"), "--config",
                    os.path.join(FIXTURE_DIR, "config.json"), "--no-batch-variants", "--out", str(dst)),
               limit_bytes=1 << 16)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"Error: cannot write output {dst}: "), done.stderr
    assert not dst.exists() and not temporaries(dst)
