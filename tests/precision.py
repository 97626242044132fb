"""Comparing a low-precision model with its float32 reference at the scale of the signal.

Boundaries are a hard `p > 0.5` decision, so a half-precision model may decide a few differently, and
every position after such a flip sees other chunks: its logits differ by the model's whole dynamic
range, not by rounding. Those positions say nothing about precision, so the error is measured where no
differing decision can reach (causality: every byte before the first flip, per row), and relative to
the size of the reference logits there, so that it means the same for any model."""

from __future__ import annotations

import numpy as np


def unflipped_positions(ref_masks: list[np.ndarray], got_masks: list[np.ndarray], valid: np.ndarray) -> np.ndarray:
    """(B, L) bool: valid byte positions before the first one (per row) where any stage's boundary
    decision differs. ref_masks / got_masks: each stage's (B, L_s) boundary mask, outermost first
    (stage s + 1 runs over the entries stage s selected, left-aligned)."""
    keep = valid.astype(bool).copy()
    for b in range(valid.shape[0]):
        cut = int(valid[b].sum())
        pos = np.arange(valid.shape[1])  # byte position of each entry of the current stage's sequence
        for ref, got in zip(ref_masks, got_masks):
            n = min(len(pos), ref.shape[1], got.shape[1])
            pos, r, g = pos[:n], ref[b, :n].astype(bool), got[b, :n].astype(bool)
            differ = np.nonzero((r != g) & (pos < cut))[0]
            if differ.size:
                cut = int(pos[differ[0]])
            pos = pos[r]  # the entries the next stage runs over (the same as `got`'s before `cut`)
        keep[b, cut:] = False
    return keep


def relative_error(got: np.ndarray, ref: np.ndarray, where: np.ndarray) -> float:
    """mean |got - ref| / mean |ref| over the (B, L) positions `where` (logits (B, L, V))."""
    return float(np.abs(got - ref)[where].mean() / np.abs(ref)[where].mean())
