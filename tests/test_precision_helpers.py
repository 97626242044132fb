"""tests/precision.py, the helper the low-precision tests rely on: which positions a differing boundary
decision cannot have reached, and the error relative to the signal."""

import numpy as np
import pytest

from precision import relative_error, unflipped_positions


def test_positions_from_the_first_flip_on_are_dropped_at_any_stage():
    valid = np.array([[1, 1, 1, 1, 1, 1, 1, 0]], bool)
    s0 = np.array([[1, 0, 1, 1, 0, 1, 1, 0]], bool)  # stage-1 entries sit at bytes 0, 2, 3, 5, 6
    s1 = np.array([[1, 0, 1, 0, 1]], bool)
    assert unflipped_positions([s0, s1], [s0, s1], valid).tolist() == valid.tolist()
    flip0 = s0.copy()
    flip0[0, 4] = True  # stage 0 differs at byte 4
    assert np.flatnonzero(unflipped_positions([s0, s1], [flip0, s1], valid)).tolist() == [0, 1, 2, 3]
    flip1 = s1.copy()
    flip1[0, 3] = True  # stage 1 differs at its entry 3 = byte 5
    assert np.flatnonzero(unflipped_positions([s0, s1], [s0, flip1], valid)).tolist() == [0, 1, 2, 3, 4]


def test_relative_error_is_the_fraction_of_the_signal():
    ref = np.array([[[1.0, -3.0], [2.0, 2.0]]])
    where = np.ones((1, 2), bool)
    assert relative_error(ref, ref, where) == 0
    assert relative_error(0.5 * ref, ref, where) == 0.5
    assert relative_error(10 * (ref + 0.1), 10 * ref, where) == pytest.approx(relative_error(ref + 0.1, ref, where))  # scale-free
