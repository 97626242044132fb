"""Running an exported H-Net with onnxruntime and numpy only (no torch, no MLX).

    from hnet_export import OnnxHNet
    m = OnnxHNet("onnx_dir", provider="auto")      # "cpu" | "cuda" | "auto"
    out = m.prefill(input_ids, mask)                # numpy in; out.logits (B, L, 256), out.routing[s]
    out = m.extend(piece_ids, piece_mask)           # continue the live states with a piece (any length)
    out = m.step(next_ids)                          # (B, 1) -> out.logits (B, 1, 256); states live in m

Every session of one OnnxHNet (prefill, extend, step, step_cond) uses the same copy of the
weights: the export's weights file is mapped once and its tensors are handed to each session with
SessionOptions.add_initializer (onnxruntime then neither reads nor copies them). The CPU
provider's weight pre-packing gives each session a private re-laid-out copy (onnxruntime's
container that shares them between sessions is in its C API only, not in Python), so by default
a float export pre-packs in its step graphs only, and only up to PREPACK_MAX_WEIGHTS; a quantized
one in prefill and the step graphs (see OnnxHNet._prepacks, docs/decode-performance.md and
bench/bench_onnx_memory.py). `hnet generate` calls warm_up: every session it will use is created
and run once at load.

The recurrent states (see io.json) stay inside the object between calls. On CUDA (onnxruntime-gpu)
they stay on the device through I/O binding and only the logits and routing outputs come back to
the host. Global attention caches are buffers of `capacity` slots that grow
(doubling) as decoding goes on, up to the export's max_seqlen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnxruntime as ort

from hnet_core.config import HNetConfig
from hnet_core.errors import HNetError
from hnet_core.io import read_json
from hnet_core.step_threads import ENV as STEP_THREADS_ENV, steps_in_parallel
from hnet_core.tokenizer import BOS_ID

FORMAT_VERSION = 1  # of export.json / io.json (hnet_export.exporter writes the same number)
PROVIDERS = ("auto", "cpu", "cuda")
STEP_VARIANTS = ("auto", "where", "cond")
WARM_ROLES = ("prefill", "extend", "step")  # what a caller of warm_up will do
STEP_GRAPHS = ("step", "step_cond")
# Bytes of float weights up to which the step graphs pre-pack by default: the mapped weights, one
# packed copy and ~0.25 GB of process, buffers and caches stay within 1.3x the weights + 0.4 GB.
PREPACK_MAX_WEIGHTS = 200_000_000
_MIN_CAPACITY = 64


@dataclass
class RoutingOutput:
    boundary_prob: np.ndarray  # (B, L_s) float32: p_t of eq. 4 (NaN in a step where the stage did not run)
    boundary_mask: np.ndarray  # (B, L_s) bool: the token starts a chunk
    valid: np.ndarray  # (B, L_s) bool: real entries (prefill: within the row; step: the stage ran)


@dataclass
class OnnxOutput:
    logits: np.ndarray  # (B, L, vocab) float32
    routing: list[RoutingOutput]


def _read_json(path: str) -> dict:
    # the same messages as export/js/node.mjs
    return read_json(path, "{path} not found; is this a directory written by `hnet export onnx`?",
                     "{path} is not valid JSON ({error}); re-export the model")


def _providers(provider: str) -> tuple[list[str], str]:
    if provider not in PROVIDERS:
        raise HNetError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if provider == "cuda" and not has_cuda:
        raise HNetError("onnxruntime has no CUDA provider here; pip install onnxruntime-gpu (and a CUDA driver), "
                        "or use provider='cpu'")
    if provider == "cuda" or (provider == "auto" and has_cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


class SharedWeights:
    """The export's weights file (export.json `weights`: file, and per tensor its offset, length,
    dtype and shape) mapped read-only once, as OrtValues every session is given instead of reading
    the file itself. The pages are the file's (page cache), so the process holds one copy no
    matter how many sessions use them."""

    def __init__(self, directory: str, table: dict):
        path = os.path.join(directory, table["file"])
        if not os.path.exists(path):
            raise HNetError(f"{path} not found; re-export the model with `hnet export onnx`")
        self.buffer = np.memmap(path, dtype=np.uint8, mode="r")
        self.values: dict[str, ort.OrtValue] = {}
        self.nbytes = int(self.buffer.size)
        for name, t in table["tensors"].items():
            end = t["offset"] + t["length"]
            if end > self.buffer.size:
                raise HNetError(f"{path} is shorter than export.json says (truncated?); re-export the model")
            array = self.buffer[t["offset"] : end].view(np.dtype(t["dtype"])).reshape(t["shape"])
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)  # no copy; keeps `array` alive

    def add_to(self, options: ort.SessionOptions) -> None:
        for name, value in self.values.items():
            options.add_initializer(name, value)


class OnnxHNet:
    def __init__(self, path: str, provider: str = "auto", threads: int | None = None,
                 step_variant: str = "auto", io_binding: bool | None = None, share_weights: bool = True,
                 prepack: bool | Sequence[str] | None = None):
        """Load an exported directory. step_variant: "where" (every level every step), "cond" (inner
        levels only when some sample is at a boundary; in every export unless --no-batch-variants) or
        "auto" (cond at batch 1 on CPU, else where). io_binding: keep states in onnxruntime-owned
        buffers between steps (default: on for CUDA). share_weights: give all sessions the one mapped
        copy of an external weights file (default; False lets each session load its own, as before).
        prepack: let the CPU provider re-lay weights out per session: True everywhere, False nowhere
        (one copy of the weights, slower decoding), a collection of graph names (e.g. ("step",
        "step_cond")), or None (default: see _prepacks)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise HNetError(f"ONNX model directory not found: {path} (create it with `hnet export onnx`)")
        if step_variant not in STEP_VARIANTS:
            raise HNetError(f"step_variant must be one of {', '.join(STEP_VARIANTS)}, got {step_variant!r}")
        self.path = path
        self.meta = _read_json(os.path.join(path, "export.json"))
        missing = [k for k in ("format_version", "max_seqlen", "dtype", "graphs") if k not in self.meta]
        if missing or "prefill" not in self.meta.get("graphs", {}) or "step" not in self.meta.get("graphs", {}):
            raise HNetError(f"{path}/export.json lacks {missing or 'the prefill/step graphs'}; re-export the model")
        if self.meta["format_version"] > FORMAT_VERSION:
            raise HNetError(f"{path} was exported by a newer hnet-mlx (format {self.meta['format_version']}); upgrade hnet-mlx")
        self.io = _read_json(os.path.join(path, "io.json"))
        self.config = HNetConfig.from_dict(_read_json(os.path.join(path, "config.json")))
        self.max_seqlen = int(self.meta["max_seqlen"])
        self.dtype = self.meta["dtype"]
        self.num_stages = self.config.num_stages
        self._step_parallel = steps_in_parallel(self.config)
        providers, self.device = _providers(provider)
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        self.quantization = self.meta.get("quantization")
        table = self.meta.get("weights")
        self.shared_weights = SharedWeights(path, table) if share_weights and table else None
        self.prepack = prepack
        self._threads, self._providers = threads, providers
        self.sessions: dict[str, ort.InferenceSession] = {}
        self._output_names: dict[int, list[str]] = {}  # id(session) -> its output names
        for file in self.meta["graphs"].values():
            if not os.path.exists(os.path.join(path, file)):
                raise HNetError(f"{os.path.join(path, file)} not found; re-export the model with `hnet export onnx`")
        if step_variant == "cond" and "step_cond" not in self.meta["graphs"]:
            raise HNetError("this export has no step_cond.onnx (exported with --no-batch-variants); re-export without "
                           "it or use step_variant='where'")
        self._session("prefill")  # loads now, so a broken export fails here; step graphs load on first use
        self.step_variant = step_variant
        self._step_specs = {s["name"]: s for s in self.io["step"]["inputs"]}
        self._state_names = [s["name"][len("past."):] for s in self.io["step"]["inputs"] if s["name"].startswith("past.")]
        self._growable = [n for n in self._state_names if "kv_slots" in self._step_specs["past." + n]["shape"]]
        self._states: dict | None = None
        self._position = 0  # bytes consumed by the longest sample (its level-0 length)
        self._capacity = 0  # slots in each global KV cache (0 until the first step sizes them)
        self._reserve = 0  # capacity asked for at prefill
        self._batch = 0

    # -- helpers ---------------------------------------------------------------------------------

    def _session_options(self, name: str) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the CPU provider warns about nodes it cannot pre-fold
        step = name in ("step", "step_cond")
        forced = os.environ.get(STEP_THREADS_ENV, "").strip()
        if self._threads:
            options.intra_op_num_threads = int(self._threads)
        elif step and forced.isdigit():  # 0: onnxruntime's own choice
            options.intra_op_num_threads = int(forced)
        elif step and not self._step_parallel:
            # A step multiplies one row per sample: small matrices run on one thread
            # (hnet_core/step_threads.py; a second thread collapses when another process is busy).
            options.intra_op_num_threads = 1
        if step:
            # Spinning threads wait for work by burning a core; between decode steps (Python,
            # sampling) and on a busy machine that core is taken from someone who needs it.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self._prepacks(name):
            # Pre-packing copies every MatMul weight into a kernel-specific layout owned by the
            # session: one more copy of the model per session.
            options.add_session_config_entry("session.disable_prepacking", "1")
        if self.shared_weights is not None:
            self.shared_weights.add_to(options)
        return options

    def _prepacks(self, name: str) -> bool:
        """Whether the session of graph `name` pre-packs its weights (a private re-laid-out copy)."""
        if isinstance(self.prepack, bool):
            return self.prepack
        if self.prepack is not None:
            return name in self.prepack
        if self.shared_weights is None:
            # Weights inside each graph (exports under 64 MiB): every session holds its own anyway.
            return self.quantization is not None or name != "prefill"
        if name == "prefill":
            # Float MatMuls on many rows pack panels as they go; MatMulNBits without its packed
            # layout dequantizes every block on every call (3x slower prefill, bench_onnx_memory).
            return self.quantization is not None
        if name not in STEP_GRAPHS:
            # extend: only prompts longer than one piece and a server's later pieces use it; its
            # copy would be a third one (quantized pieces after the first read 3x slower).
            return False
        # One row per byte: unpacked float weights decode 10-20% slower, unpacked MatMulNBits 2-3x.
        # The packed copy doubles a float model's memory: above PREPACK_MAX_WEIGHTS the 1.3x budget wins.
        return self.quantization is not None or self.shared_weights.nbytes <= PREPACK_MAX_WEIGHTS

    def _session(self, name: str) -> ort.InferenceSession:
        """The onnxruntime session of one graph. warm_up creates the ones a caller will use at load;
        one it did not foresee (a batch size it was not told) is created here on first use."""
        if name not in self.sessions:
            graph_path = os.path.join(self.path, self.meta["graphs"][name])
            try:
                options = self._session_options(name)
                self.sessions[name] = ort.InferenceSession(graph_path, options, providers=self._providers)
            except Exception as e:  # a truncated file, missing weights, an opset the runtime lacks
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise HNetError(f"onnxruntime cannot load {graph_path}: {reason}") from None
        return self.sessions[name]

    def _routing(self, outputs: list, first: int, step: bool) -> list[RoutingOutput]:
        routing = []
        for s in range(self.num_stages):
            prob, mask, valid = outputs[first + 3 * s : first + 3 * s + 3]
            prob = np.asarray(prob, dtype=np.float32)
            valid = np.asarray(valid, dtype=bool)
            if step:
                prob = np.where(valid, prob, np.float32(np.nan))
            routing.append(RoutingOutput(prob, np.asarray(mask, dtype=bool), valid))
        return routing

    def _check_ids(self, ids, what: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise HNetError(f"{what} must have shape (batch, length), got {ids.shape}")
        if ids.size == 0:
            raise HNetError(f"{what} is empty; give at least one byte per sample")
        if not np.issubdtype(ids.dtype, np.integer):
            raise HNetError(f"{what} must hold integers (bytes), got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise HNetError(f"{what} must hold byte values in [0, {self.config.vocab_size})")
        return ids.astype(np.int64)

    def _to_device(self, array: np.ndarray):
        if not self.io_binding:
            return np.ascontiguousarray(array)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _to_host(self, value) -> np.ndarray:
        return value.numpy() if isinstance(value, ort.OrtValue) else value

    def _pad_slots(self, value, slots: int):
        """Pad axis 1 of a global KV buffer with zeros to `slots`."""
        array = self._to_host(value)
        if array.shape[1] >= slots:
            return self._to_device(array)
        pad = np.zeros((array.shape[0], slots - array.shape[1], *array.shape[2:]), dtype=array.dtype)
        return self._to_device(np.concatenate([array, pad], axis=1))

    # -- API -------------------------------------------------------------------------------------

    def prefill(self, input_ids, mask=None, capacity: int | None = None) -> OnnxOutput:
        """Run the prompts (B, L), right-padded with `mask` (default: all real), and keep the states.

        capacity: decode slots to reserve (prompt + bytes you will generate); grows on demand.
        Prompts longer than the export's max_seqlen still give logits (e.g. for evaluation), but
        decoding from them is refused."""
        ids = self._check_ids(input_ids, "input_ids")
        B, L = ids.shape
        if mask is None:
            mask = np.ones((B, L), dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (B, L):
            raise HNetError(f"mask shape {mask.shape} must equal input_ids shape {(B, L)}")
        if not mask[:, 0].all():
            raise HNetError("every prompt in the batch needs at least one byte (mask[:, 0] must be True)")
        if L > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
            raise HNetError("mask must be right-padded: True on a prefix of each row, then False")
        outputs = self._session("prefill").run(None, {"input_ids": ids, "mask": mask})
        first_state = 1 + 3 * self.num_stages
        self._position = int(mask.sum(-1).max())
        self._batch = B
        self._states = None
        if self._position <= self.max_seqlen:
            # Kept as returned (an evaluation that only prefills pays nothing for decode buffers);
            # sized and moved to the device here when the caller says it will decode (capacity),
            # else by the first step. Padding the caches costs as much as a step or more: done here,
            # it is prompt time, and the first decode step costs what the others do.
            self._states = dict(zip(self._state_names, outputs[first_state:]))
            self._capacity = 0
            self._reserve = max(capacity or 0, self._position + _MIN_CAPACITY)
            if capacity is not None:
                self._start_decoding()
        return OnnxOutput(np.asarray(outputs[0], dtype=np.float32), self._routing(outputs, 1, step=False))

    def _start_decoding(self) -> None:
        """Pad the prefill's global KV caches to the reserved capacity and move every state to the device."""
        self._capacity = min(self.max_seqlen, self._reserve)
        self._states = {n: self._pad_slots(v, self._capacity) if n in self._growable else self._to_device(v)
                        for n, v in self._states.items()}

    def _grow(self) -> None:
        """Double the global KV buffers (up to max_seqlen) when the next position would not fit."""
        self._capacity = min(self.max_seqlen, max(2 * self._capacity, self._position + 1))
        for name in self._growable:
            self._states[name] = self._pad_slots(self._states[name], self._capacity)

    def warm_up(self, batch: int | None = 1, roles: Sequence[str] = WARM_ROLES) -> None:
        """Create now every session that `roles` (prefill, extend, step) will use and run each once
        on one byte per sample, so that neither creating a session (seconds for a large model) nor a
        session's first run (its buffers, an If's branch) lands on a user's first bytes. batch: the
        batch size decoding will use, which picks the step graph (None: every step graph, for a
        caller whose batch size changes). The live state is left as it was."""
        unknown = set(roles) - set(WARM_ROLES)
        if unknown:
            raise HNetError(f"warm_up roles must be among {', '.join(WARM_ROLES)}, got {sorted(unknown)}")
        sizes = [1, 2] if batch is None else [int(batch)]
        kept = (self._states, self._position, self._capacity, self._reserve, self._batch)
        try:
            for b in sizes:
                byte = np.full((b, 1), BOS_ID, dtype=np.int64)
                self.prefill(byte)  # the prefill session always exists (created by __init__)
                if "extend" in roles and "extend" in self.meta["graphs"]:
                    self.extend(byte)
                if "step" in roles:
                    self.step(byte)
                    self.step(byte)  # the If of step_cond runs its other branch on some models' second byte
        finally:
            self._states, self._position, self._capacity, self._reserve, self._batch = kept

    def _step_graph(self, batch: int) -> str:
        variant = self.step_variant
        if variant == "auto":
            # At batch 1 on CPU the If of step_cond.onnx skips the inner levels off-boundary, float or
            # quantized alike (bench/bench_onnx_quant.py, onnxruntime 1.32: 1.8x step.onnx for int8 and
            # int4 on the hnet_1stage_L shape). At batch > 1 some sample is nearly always at a boundary,
            # and on CUDA the If would synchronise with the host every byte.
            cond = "step_cond" in self.meta["graphs"]
            variant = "cond" if (cond and batch == 1 and self.device == "cpu") else "where"
        return "step_cond" if variant == "cond" else "step"

    def _session_for_step(self) -> ort.InferenceSession:
        return self._session(self._step_graph(self._batch))

    def extend(self, input_ids, mask=None, capacity: int | None = None) -> OnnxOutput:
        """Continue the live states with a piece (B, L), right-padded with `mask` (default: all real);
        a row with an all-False mask leaves its sample as it is. Logits and boundaries equal those of
        one prefill over everything fed so far (nothing is forced at the cut: routing compares the
        piece's first byte with the last cached state). On a fresh object this is prefill()."""
        if self._states is None and not self._batch:
            return self.prefill(input_ids, mask, capacity)
        self._check_live()
        if "extend" not in self.meta["graphs"]:
            raise HNetError("this export has no extend.onnx (it predates prompts in pieces); re-export the model "
                            "with `hnet export onnx` to continue a live state")
        ids = self._check_ids(input_ids, "input_ids")
        B, L = ids.shape
        if B != self._batch:
            raise HNetError(f"the live state holds {self._batch} samples; extend takes input_ids of shape "
                            f"({self._batch}, length), got {ids.shape}")
        mask = np.ones((B, L), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != (B, L):
            raise HNetError(f"mask shape {mask.shape} must equal input_ids shape {(B, L)}")
        if L > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
            raise HNetError("mask must be right-padded: True on a prefix of each row, then False")
        lengths = np.asarray(self._to_host(self._states["level0.length"])) + mask.sum(-1)
        end = int(lengths.max())
        if end > self.max_seqlen:
            raise HNetError(f"the state ({self._position} bytes) + this piece ({int(mask.sum(-1).max())} bytes) exceed "
                            f"this export's max_seqlen {self.max_seqlen}; re-export with a larger --max-seqlen")
        if self._capacity == 0:
            self._reserve = max(self._reserve, capacity or 0, end)
            self._start_decoding()
        if end > self._capacity:  # every global KV buffer must hold each sample's past + piece
            self._capacity = min(self.max_seqlen, max(2 * self._capacity, end, capacity or 0))
            for name in self._growable:
                self._states[name] = self._pad_slots(self._states[name], self._capacity)
        outputs = self._run_stateful(self._session("extend"), {"input_ids": ids, "mask": mask})
        self._position = end
        return OnnxOutput(np.asarray(outputs[0], dtype=np.float32), self._routing(outputs, 1, step=False))

    def _check_live(self) -> None:
        if self._states is None:
            if self._batch:
                raise HNetError(f"the prompt is longer than this export's max_seqlen {self.max_seqlen}; "
                                "re-export with a larger --max-seqlen to decode from it")
            raise HNetError("call prefill(input_ids, mask) before step()")

    def _run_stateful(self, session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> list:
        """Run a graph that maps past.* states to present.* states; keep the new states, return the
        logits and routing outputs (host arrays) first, as the graph lists them."""
        names = self._output_names.get(id(session))
        if names is None:  # get_outputs() builds new objects every call: once per session, not per byte
            names = self._output_names[id(session)] = [o.name for o in session.get_outputs()]
        first_state = 1 + 3 * self.num_stages
        if self.io_binding:
            binding = session.io_binding()
            for name, value in inputs.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in self._state_names:
                binding.bind_ortvalue_input("past." + name, self._states[name])
            for k, name in enumerate(names):
                binding.bind_output(name, "cpu" if k < first_state else self.device)
            session.run_with_iobinding(binding)
            values = binding.get_outputs()
            outputs = [v.numpy() for v in values[:first_state]] + list(values[first_state:])
        else:
            feed = {**inputs, **{"past." + n: v for n, v in self._states.items()}}
            outputs = session.run(None, feed)
        self._states = {n[len("present."):]: v for n, v in zip(names[first_state:], outputs[first_state:])}
        return outputs

    def step(self, next_ids) -> OnnxOutput:
        """Consume one byte per sample: next_ids (B, 1) -> logits (B, 1, vocab)."""
        self._check_live()
        ids = self._check_ids(next_ids, "next_ids")
        if ids.shape != (self._batch, 1):
            raise HNetError(f"step takes next_ids of shape ({self._batch}, 1), got {ids.shape}")
        if self._position >= self.max_seqlen:
            raise HNetError(f"generation reached this export's max_seqlen {self.max_seqlen}; "
                            "re-export with a larger --max-seqlen")
        if self._capacity == 0:
            self._start_decoding()
        if self._position >= self._capacity:
            self._grow()
        outputs = self._run_stateful(self._session_for_step(), {"input_ids": ids})
        self._position += 1
        return OnnxOutput(np.asarray(outputs[0], dtype=np.float32), self._routing(outputs, 1, step=True))

    @property
    def capacity(self) -> int:
        """Slots currently reserved in each global attention cache (grows on demand)."""
        return self._capacity

    # -- live state as a value (batching many requests: export/batch_cache.py) ------------------

    def get_state(self) -> "OnnxState":
        """The live states as host arrays (a snapshot: later calls do not change it)."""
        from .batch_cache import OnnxState

        self._check_live()
        return OnnxState({n: np.asarray(self._to_host(v)) for n, v in self._states.items()}, self._position, self._batch)

    def set_state(self, state: "OnnxState") -> None:
        """Continue from `state` (from get_state or batch_cache): the next step or extend uses it."""
        self._states = dict(state.states)
        self._position, self._batch = state.position, state.batch
        slots = max([self._states[n].shape[1] for n in self._growable], default=0)
        # Decoding restarts from host arrays: the first step pads them to the capacity and moves them.
        self._capacity, self._reserve = 0, max(slots, state.position + _MIN_CAPACITY)
