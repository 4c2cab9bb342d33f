"""Tests for cl.metrics on hand-made accuracy matrices.

Notation in comments: a[i, j] is the paper's 1-based notation, a[i, j] = R[i, j-1]
(row i = after training experience i, row 0 = init; column j-1 = experience j).
"""

import math

import numpy as np
import pytest

from cl.metrics import (
    accuracy,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    compute_metrics,
    forward_transfer,
)

NAN = float("nan")

# Worked 3-task case (T = 3, shape 4 x 3).
#            exp1  exp2  exp3
R3 = np.array(
    [
        [0.10, 0.20, 0.30],  # row 0: init
        [0.90, 0.40, 0.35],  # row 1: after exp1
        [0.70, 0.80, 0.50],  # row 2: after exp2
        [0.60, 0.75, 0.85],  # row 3: after exp3 (final)
    ]
)


def test_worked_three_task_case():
    # ACC = (a[3,1] + a[3,2] + a[3,3]) / 3
    #     = (0.60 + 0.75 + 0.85) / 3 = 2.20 / 3 = 0.733333...
    assert accuracy(R3) == pytest.approx(2.20 / 3)

    # BWT = 1/(T-1) * [ (a[3,1] - a[1,1]) + (a[3,2] - a[2,2]) ]
    #     = 1/2 * [ (0.60 - 0.90) + (0.75 - 0.80) ]
    #     = 1/2 * [ -0.30 + -0.05 ] = 1/2 * -0.35 = -0.175
    assert backward_transfer(R3) == pytest.approx(-0.175)

    # FWT = 1/(T-1) * [ (a[1,2] - a[0,2]) + (a[2,3] - a[0,3]) ]
    #     = 1/2 * [ (0.40 - 0.20) + (0.50 - 0.30) ]
    #     = 1/2 * [ 0.20 + 0.20 ] = 0.20
    assert forward_transfer(R3) == pytest.approx(0.20)

    # f_1 = max(a[1,1], a[2,1]) - a[3,1] = max(0.90, 0.70) - 0.60 = 0.30
    # f_2 = max(a[1,2], a[2,2]) - a[3,2] = max(0.40, 0.80) - 0.75 = 0.05
    # F_3 = (0.30 + 0.05) / 2 = 0.175
    assert average_forgetting(R3) == pytest.approx(0.175)

    # step 1: mean(a[1,1])               = 0.90
    # step 2: mean(a[2,1], a[2,2])       = (0.70 + 0.80) / 2 = 0.75
    # step 3: mean(a[3,1], a[3,2], a[3,3]) = 2.20 / 3 = 0.733333...
    # A = (0.90 + 0.75 + 0.733333...) / 3 = 2.383333... / 3 = 0.794444...
    assert average_incremental_accuracy(R3) == pytest.approx((0.90 + 0.75 + 2.20 / 3) / 3)


def test_compute_metrics_matches_functions_and_returns_python_floats():
    m = compute_metrics(R3)
    assert set(m) == {"acc", "bwt", "fwt", "forgetting", "avg_inc_acc"}
    assert m == {
        "acc": pytest.approx(2.20 / 3),
        "bwt": pytest.approx(-0.175),
        "fwt": pytest.approx(0.20),
        "forgetting": pytest.approx(0.175),
        "avg_inc_acc": pytest.approx((0.90 + 0.75 + 2.20 / 3) / 3),
    }
    for value in m.values():
        assert type(value) is float


def test_accepts_nested_lists():
    assert compute_metrics(R3.tolist()) == compute_metrics(R3)


def test_single_experience():
    # T = 1: shape 2 x 1. No earlier experience -> bwt, fwt, forgetting are None.
    R = [[0.10], [0.70]]
    m = compute_metrics(R)
    # ACC = a[1,1] = 0.70; A = mean(a[1,1]) / 1 = 0.70
    assert m["acc"] == pytest.approx(0.70)
    assert m["avg_inc_acc"] == pytest.approx(0.70)
    assert m["bwt"] is None
    assert m["fwt"] is None
    assert m["forgetting"] is None
    assert backward_transfer(R) is None
    assert forward_transfer(R) is None
    assert average_forgetting(R) is None


def test_only_init_and_final_rows_measured():
    # e.g. joint training: only rows 0 and T exist.
    R = np.array(
        [
            [0.10, 0.20, 0.30],
            [NAN, NAN, NAN],
            [NAN, NAN, NAN],
            [0.60, 0.75, 0.85],
        ]
    )
    m = compute_metrics(R)
    assert m["acc"] == pytest.approx(2.20 / 3)
    assert m["bwt"] is None
    assert m["fwt"] is None
    assert m["forgetting"] is None
    assert m["avg_inc_acc"] is None


def test_nan_in_final_row_makes_acc_none_not_nan():
    R = R3.copy()
    R[3, 2] = NAN
    m = compute_metrics(R)
    assert m["acc"] is None
    assert m["bwt"] == pytest.approx(-0.175)  # BWT does not read a[3,3]
    assert m["avg_inc_acc"] is None
    for value in m.values():
        assert value is None or not math.isnan(value)


def test_missing_init_row_only_affects_fwt():
    R = R3.copy()
    R[0, :] = NAN
    m = compute_metrics(R)
    assert m["fwt"] is None
    assert m["acc"] == pytest.approx(2.20 / 3)
    assert m["bwt"] == pytest.approx(-0.175)
    assert m["forgetting"] == pytest.approx(0.175)


def test_nan_in_unused_entries_is_ignored():
    # a[1,3] = R[1, 2] is used by no metric (FWT uses a[2,3], forgetting's
    # max ranges over columns j <= T-1 only), and a[0,1] = R[0, 0] is unused
    # by FWT (which starts at j = 2).
    R = R3.copy()
    R[1, 2] = NAN
    R[0, 0] = NAN
    assert compute_metrics(R) == compute_metrics(R3)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(3),  # 1-D
        np.zeros((3, 3)),  # square: missing the init row
        np.zeros((5, 3)),  # too many rows
        np.zeros((2, 3)),  # too few rows
        np.zeros((1, 0)),  # T = 0
        np.zeros((2, 2, 1)),  # 3-D
        [["a", "b"], ["c", "d"], ["e", "f"]],  # not numeric
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        accuracy,
        backward_transfer,
        forward_transfer,
        average_forgetting,
        average_incremental_accuracy,
        compute_metrics,
    ],
)
def test_shape_errors(fn, bad):
    with pytest.raises(ValueError, match=r"\(T\+1, T\)"):
        fn(bad)


def test_infinite_values_rejected():
    R = R3.copy()
    R[2, 1] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        compute_metrics(R)


# ---------------------------------------------------------------- trap guards


def test_trap_bwt_divides_by_t_minus_1_not_t():
    # The GEM *code* averages over T entries (last term a[3,3]-a[3,3] = 0):
    #   (-0.30 - 0.05 + 0) / 3 = -0.116666...  = (T-1)/T * paper value.
    # The paper divides by T-1: -0.35 / 2 = -0.175.
    bwt = backward_transfer(R3)
    assert bwt == pytest.approx(-0.35 / 2)
    assert bwt != pytest.approx(-0.35 / 3)
    assert bwt != pytest.approx((3 - 1) / 3 * -0.175)


def test_trap_forgetting_can_be_negative_and_excludes_final_row():
    # T = 2. Accuracy on exp1 rises after training exp2.
    R = [
        [0.10, 0.10],  # init
        [0.50, 0.30],  # after exp1
        [0.70, 0.90],  # after exp2 (final)
    ]
    # f_1 = max_{l=1..1} a[l,1] - a[2,1] = 0.50 - 0.70 = -0.20 ; F = -0.20 / 1
    # L2P-style max over l=1..2 (incl. final row): max(0.50, 0.70) - 0.70 = 0.0
    f = average_forgetting(R)
    assert f == pytest.approx(-0.20)
    assert f < 0
    assert f != pytest.approx(0.0)
    # and BWT agrees in sign: a[2,1] - a[1,1] = 0.70 - 0.50 = +0.20
    assert backward_transfer(R) == pytest.approx(0.20)


def test_trap_forgetting_uses_max_over_earlier_rows_not_row_after_training():
    # T = 3. Exp1 peaks after exp2 (row 2), then drops.
    R = [
        [0.00, 0.00, 0.00],  # init
        [0.50, 0.10, 0.10],  # after exp1
        [0.80, 0.60, 0.20],  # after exp2
        [0.40, 0.50, 0.90],  # after exp3 (final)
    ]
    # f_1 = max(a[1,1], a[2,1]) - a[3,1] = max(0.50, 0.80) - 0.40 = 0.40
    # f_2 = max(a[1,2], a[2,2]) - a[3,2] = max(0.10, 0.60) - 0.50 = 0.10
    # F_3 = (0.40 + 0.10) / 2 = 0.25
    # Avalanche-style (a[j,j] - a[T,j]): ((0.50-0.40) + (0.60-0.50)) / 2 = 0.10
    f = average_forgetting(R)
    assert f == pytest.approx(0.25)
    assert f != pytest.approx(0.10)


def test_trap_forgetting_max_includes_rows_before_experience_was_trained():
    # Paper: max over l in 1..T-1, which includes l < j.
    R = [
        [0.00, 0.00, 0.00],  # init
        [0.90, 0.70, 0.10],  # after exp1: exp2 already at 0.70 (before training it)
        [0.80, 0.60, 0.20],  # after exp2
        [0.80, 0.50, 0.90],  # after exp3 (final)
    ]
    # f_1 = max(0.90, 0.80) - 0.80 = 0.10
    # f_2 = max(a[1,2], a[2,2]) - a[3,2] = max(0.70, 0.60) - 0.50 = 0.20
    # F_3 = (0.10 + 0.20) / 2 = 0.15
    # (max only over l >= j would give f_2 = 0.60 - 0.50 = 0.10, F = 0.10)
    f = average_forgetting(R)
    assert f == pytest.approx(0.15)
    assert f != pytest.approx(0.10)


def test_trap_fwt_uses_accuracy_before_training_not_after():
    # Worked case: correct FWT uses a[j-1, j] (numpy R[j-1, j-1], the diagonal):
    #   ((0.40 - 0.20) + (0.50 - 0.30)) / 2 = 0.20
    # Wrong variant with a[j, j] (numpy sub-diagonal R[j, j-1]):
    #   ((0.80 - 0.20) + (0.85 - 0.30)) / 2 = (0.60 + 0.55) / 2 = 0.575
    fwt = forward_transfer(R3)
    assert fwt == pytest.approx(0.20)
    assert fwt != pytest.approx(0.575)


def test_trap_fwt_ignores_first_experience():
    # FWT sums j = 2..T only: changing anything in column 1 (exp1) leaves it unchanged.
    R = R3.copy()
    R[:, 0] = [0.99, 0.01, 0.42, 0.33]
    assert forward_transfer(R) == pytest.approx(0.20)


def test_percent_scale_is_preserved():
    m = compute_metrics(R3 * 100)
    assert m["acc"] == pytest.approx(220 / 3)
    assert m["bwt"] == pytest.approx(-17.5)
    assert m["fwt"] == pytest.approx(20.0)
    assert m["forgetting"] == pytest.approx(17.5)
