"""Showing how H-Net segments text: per-stage chunk boundaries at byte level, rendered for a terminal
or as a standalone HTML page. Framework-free; the CLIs feed it boundary masks from any backend.

A routing stage s decides over the tokens of level s: stage 0 over bytes, stage 1 over stage-0
chunks, and so on. `byte_boundaries` lifts every stage back to byte positions, so a byte starts a
stage-s chunk iff it starts chunks at all stages <= s. A boundary inside a multi-byte character is
shown at that character (characters are never split on screen).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

PALETTE = ["#cfe8ff", "#ffe3c2", "#d7f5d0", "#f6d0f0", "#fff6b3", "#d9d4ff"]
TERMINAL_STYLES = ["black on #cfe8ff", "black on #ffd8a8", "black on #c7f0c0", "black on #f3c4ec",
                   "black on #fff29a", "black on #d0caff"]


def byte_boundaries(stage_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Per-stage boundary masks over that stage's tokens -> per-stage masks over bytes (all (L,) bool)."""
    out: list[np.ndarray] = []
    positions = np.arange(len(stage_masks[0]))  # byte position of each token entering the stage
    for mask in stage_masks:
        mask = np.asarray(mask, dtype=bool)[: len(positions)]
        at_bytes = np.zeros(len(stage_masks[0]), dtype=bool)
        at_bytes[positions[mask]] = True
        out.append(at_bytes)
        positions = positions[mask]
    return out


def chunk_counts(boundaries: list[np.ndarray]) -> list[int]:
    """Chunks the text is split into at each stage, from byte-level masks of the text (BOS dropped):
    the boundaries, plus the chunk that began at BOS where the first byte starts none."""
    return [int(b.sum()) + (0 if len(b) and b[0] else 1) for b in boundaries]


@dataclass
class Segmentation:
    chars: list[str]  # the text, one entry per character
    char_starts: list[np.ndarray]  # per stage: (n_chars,) bool, a chunk starts at this character
    byte_count: int

    def compression_ratios(self, boundaries: list[np.ndarray]) -> list[float]:
        """Bytes per chunk at each stage (outermost first)."""
        return [self.byte_count / n for n in chunk_counts(boundaries)]

    def chunks(self, stage: int) -> list[str]:
        pieces: list[str] = []
        for c, start in zip(self.chars, self.char_starts[stage]):
            if start or not pieces:
                pieces.append(c)
            else:
                pieces[-1] += c
        return pieces


def segment(data: bytes, boundaries: list[np.ndarray]) -> Segmentation:
    """Characters of `data` (invalid bytes as U+FFFD) and where each stage's chunks start among them."""
    chars: list[str] = []
    first_byte: list[int] = []
    last_byte: list[int] = []
    i = 0
    while i < len(data):
        for n in (1, 2, 3, 4):  # the shortest prefix that decodes is one character
            try:
                c = data[i : i + n].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(c) == 1:
                break
        else:
            c, n = "\ufffd", 1
        chars.append(c)
        first_byte.append(i)
        last_byte.append(i + n - 1)
        i += n
    starts = []
    for b in boundaries:
        cum = np.concatenate([[0], np.cumsum(b)])
        # a character starts a chunk if any of its bytes does
        starts.append(np.array([cum[e + 1] - cum[s] > 0 for s, e in zip(first_byte, last_byte)], dtype=bool))
    return Segmentation(chars, starts, len(data))


def render_terminal(seg: Segmentation, stage: int):
    """A rich Text with alternating background colours per chunk of `stage`."""
    from rich.text import Text

    text = Text()
    colour = -1
    for c, start in zip(seg.chars, seg.char_starts[stage]):
        if start:
            colour += 1
        shown = c if c not in "\n\t" else {"\n": "⏎\n", "\t": "⇥"}[c]
        text.append(shown, style=TERMINAL_STYLES[colour % len(TERMINAL_STYLES)])
    return text


def render_html(seg: Segmentation, ratios: list[float], title: str = "H-Net chunks") -> str:
    """A standalone HTML page: one block per stage, each chunk a coloured span."""
    blocks = []
    for stage in range(len(seg.char_starts)):
        spans = []
        for i, chunk in enumerate(seg.chunks(stage)):
            spans.append(f'<span style="background:{PALETTE[i % len(PALETTE)]}">{html.escape(chunk)}</span>')
        blocks.append(
            f"<h2>Stage {stage}: {seg.byte_count / ratios[stage]:.0f} chunks, {ratios[stage]:.2f} bytes per chunk</h2>\n"
            f'<pre class="chunks">{"".join(spans)}</pre>'
        )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>\n"
        "<style>body{font-family:sans-serif;margin:2em} pre.chunks{white-space:pre-wrap;font-size:15px;"
        "line-height:1.7} pre.chunks span{border-right:1px solid #888;padding:1px 0}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{seg.byte_count} bytes. Each coloured span is one chunk; a new colour "
        "starts where the routing module placed a boundary.</p>\n" + "\n".join(blocks) + "\n</body></html>\n"
    )
