"""bench/quality/ship.py: the model card's measure of real words in the continuations."""

from __future__ import annotations

from bench.quality import ship


def test_training_vocabulary_keeps_words_seen_often_enough_case_ignored(tmp_path):
    (tmp_path / "a.txt").write_text("The cat sat. the CAT sat on the mat")
    (tmp_path / "b.txt").write_text("cat, mat!")
    assert ship.training_vocabulary(str(tmp_path), min_count=2) == {"the", "cat", "sat", "mat"}


def test_known_words_counts_letter_runs_and_skips_one_cut_off_at_the_end():
    vocabulary = {"the", "cat", "sat"}
    assert ship.known_words("The cat zat on", vocabulary) == (2, 3)  # "on" is cut off: not counted
    assert ship.known_words("The cat zat on.", vocabulary) == (2, 4)
    assert ship.known_words("", vocabulary) == (0, 0)
