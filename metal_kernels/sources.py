"""The kernel bodies: one `<name>.metal` file per kernel in this package."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = (
    "conv_step",
    "ssm_step",
    "ssd_chunk_state",
    "ssd_state_passing",
    "ssd_chunk_scan",
    "ssd_chunk_scan_bwd_c",
    "ssd_chunk_scan_bwd_x",
    "ssd_dlog_decay",
    "ema_dechunk",
    "ema_dechunk_bwd",
)

_LINE_COMMENT = re.compile(r"//[^\n]*")


@lru_cache(maxsize=None)
def source(name: str) -> str:
    """The body of kernel `name` as given to metal_kernel, with comments blanked out.

    MLX adds a signature parameter for every attribute or `<input>_shape` name that appears
    anywhere in the body, comments included, so comments are removed (the bodies contain no
    string literals). Lines are kept, so a line number of the body is a line of the .metal file."""
    text = (HERE / f"{name}.metal").read_text()
    return "\n".join(_LINE_COMMENT.sub("", line).rstrip() for line in text.splitlines()) + "\n"


def header_comment(name: str) -> str:
    """The leading comment block of `<name>.metal` (grid, threadgroup, inputs, outputs, math)."""
    out = []
    for line in (HERE / f"{name}.metal").read_text().splitlines():
        if not line.startswith("//"):
            break
        out.append(line[2:].strip())
    return "\n".join(out)
