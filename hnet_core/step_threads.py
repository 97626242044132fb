"""The decode step's thread policy, shared by every backend: one thread for small matrices.

A decode step multiplies one row per sample by each weight matrix. For a small matrix that is a
few microseconds of work, and splitting it across threads costs more than it saves: every
parallel region waits for all its threads, and on a machine where another process keeps a core
busy that wait is a scheduler time slice (milliseconds). Measured on a 2-core machine with one
core busy, the bundled 5M model decoded 15 B/s in torch with 2 threads and 177 B/s with 1
(issue 24). Only a matrix large enough to stream for about a millisecond gains from a second
thread, so a model whose largest matrix is below PARALLEL_MIN_ELEMENTS steps on one thread.
"""

from __future__ import annotations

from .config import HNetConfig

# 4M elements = 16 MB in float32: ~1 ms at ~20 GB/s, long enough that a late thread costs a
# fraction of the call rather than many times it. The bundled model's largest is 256 x 1408.
PARALLEL_MIN_ELEMENTS = 4 * 1024 * 1024
ENV = "HNET_STEP_THREADS"  # N forces N threads per step (0: the framework's own setting)


def largest_matrix_elements(config: HNetConfig) -> int:
    """Elements of the model's largest weight matrix (embeddings and LM head included)."""
    largest = config.vocab_size * config.d_model[0]  # embeddings, LM head
    for level, d in enumerate(config.d_model):
        kinds = {letter.lower() for letter in config.layers_at(level)}
        ssm = config.ssm_cfg.at(level)
        d_inner = ssm["expand"] * d
        if "m" in kinds:  # Mamba2 in_proj [z | xBC | dt]
            largest = max(largest, d * (2 * d_inner + 2 * ssm["d_state"] + d_inner // 64))
        if "t" in kinds:  # attention Wqkv
            largest = max(largest, 3 * d * d)
        if not config.levels[level].is_innermost:  # routing q/k, residual projection
            largest = max(largest, d * d)
        largest = max(largest, 2 * config.mlp_hidden(level) * d)  # SwiGLU fc1 (0 without MLPs)
    return largest


def steps_in_parallel(config: HNetConfig) -> bool:
    """True when the decode step's matrices are large enough for more than one thread."""
    return largest_matrix_elements(config) >= PARALLEL_MIN_ELEMENTS
