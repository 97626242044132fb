"""bench/quality/quality.py: where chunk boundaries fall relative to words, in all three readings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from bench.quality import quality  # noqa: E402  (after the torch skip)


class RuleRouter:
    """A one-stage stand-in for a model: a boundary at every input token for which `rule(byte)` holds
    (BOS, token 0, always starts a chunk, as the official routing does)."""

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, ids):
        tokens = ids[0].tolist()
        mask = torch.tensor([[True] + [self.rule(t) for t in tokens[1:]]])
        return SimpleNamespace(routing=[SimpleNamespace(boundary_mask=mask)])


def stats(tmp_path, text: bytes, rule) -> dict:
    path = tmp_path / "text.txt"
    path.write_bytes(text)
    return quality.word_start_stats(RuleRouter(rule), str(path))


def test_boundaries_on_spaces_count_as_separators_not_word_starts(tmp_path):
    w = stats(tmp_path, b"aa bb cc dd ee", lambda byte: byte == ord(" "))
    # scored bytes are 1..12 of 14: "a bb cc dd e"; 4 spaces, 4 bytes after a space, 4 word ends
    assert w["boundary_at_separator"] == [1.0]
    assert w["boundary_at_word_start"] == [0.0]
    assert w["boundary_at_word_end"] == [0.0]
    assert w["chance_separator"] == pytest.approx(4 / 12)
    assert w["chance"] == pytest.approx(4 / 12)


def test_boundaries_after_spaces_count_as_word_starts(tmp_path):
    text = b"aa bb cc dd ee"
    after_space = {i + 1 for i, c in enumerate(text) if c == ord(" ")}
    position = iter(range(len(text)))  # the rule sees the bytes in order, once each
    w = stats(tmp_path, text, lambda byte: next(position) in after_space)
    assert w["boundary_at_word_start"] == [1.0]
    assert w["boundary_at_separator"] == [0.0]
    assert w["word_starts_covered"] == [1.0]


def test_boundaries_on_last_letters_count_as_word_ends(tmp_path):
    text = b"aa bb cc dd ee"
    before_space = {i - 1 for i, c in enumerate(text) if c == ord(" ")}
    position = iter(range(len(text)))
    w = stats(tmp_path, text, lambda byte: next(position) in before_space)
    assert w["boundary_at_word_end"] == [1.0]
    assert w["boundary_at_word_start"] == [0.0]
    assert w["boundary_at_separator"] == [0.0]
