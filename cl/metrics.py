"""Continual-learning metrics computed from an accuracy matrix.

The accuracy matrix
-------------------
``R`` has shape ``(T + 1, T)`` for a stream of ``T`` experiences:

* ``R[0, c]`` is the accuracy on the test set of experience ``c + 1`` before
  any training (the random-init baseline, GEM's ``b``);
* ``R[i, c]`` for ``i = 1..T`` is the accuracy on the test set of experience
  ``c + 1`` after training on experiences ``1..i``.

So **rows are 1-based** (row ``i`` = "after training experience ``i``", row 0 =
"before training") while **columns are 0-based** (column ``c`` = experience
``c + 1``). In the formulas below ``a[i, j]`` uses the papers' 1-based
notation for both axes, i.e. ``a[i, j] = R[i, j - 1]``; ``a[0, j]`` is the
init accuracy on experience ``j``. Be careful: the paper's "diagonal"
``a[j, j]`` (accuracy on ``j`` right after training ``j``) is ``R[j, j - 1]``
in numpy, the *sub*-diagonal; the numpy diagonal ``R[c, c]`` is ``a[c, c + 1]``
(accuracy on the *next*, not-yet-trained experience), which is what FWT uses.

Definitions (paper definitions, exactly)
----------------------------------------
* ACC (average accuracy; GEM, Lopez-Paz & Ranzato 2017)::

      ACC = 1/T * sum_{j=1..T} a[T, j]

* BWT (backward transfer; GEM paper, eq. 3)::

      BWT = 1/(T-1) * sum_{j=1..T-1} (a[T, j] - a[j, j])

  Note: the official GEM code divides by ``T`` (it sums ``T`` terms, the last
  of which is zero), giving ``(T-1)/T`` times this value. We use the paper's
  ``T - 1``.

* FWT (forward transfer; GEM paper, eq. 4)::

      FWT = 1/(T-1) * sum_{j=2..T} (a[j-1, j] - a[0, j])

  i.e. accuracy on experience ``j`` after training up to ``j - 1`` (before
  ``j`` is seen), minus the accuracy at init. Not ``a[j, j] - a[0, j]``. The
  official GEM code divides this sum by ``T`` too (its first term is zero).

* Average forgetting (Chaudhry et al. 2018, "Riemannian Walk"), at the end of
  the stream ``k = T``::

      f_j = max_{l=1..T-1} a[l, j] - a[T, j]          for j = 1..T-1
      F_T = 1/(T-1) * sum_{j=1..T-1} f_j

  The max runs over rows ``1..T-1`` only: it excludes the final row (unlike
  L2P's code, which includes it and so clips forgetting at >= 0; ours can be
  negative when an old experience improves at the end), and it includes rows
  before ``j`` was trained (the paper's ``l in {1..k-1}``), i.e. it is not
  Avalanche's "row right after training ``j``" variant.

* Average incremental accuracy (iCaRL, Rebuffi et al. 2017)::

      A = 1/T * sum_{i=1..T} ( 1/i * sum_{j=1..i} a[i, j] )

Missing values
--------------
``NaN`` marks an entry that was not measured (e.g. a joint-training run only
has rows 0 and T). A metric whose *required* entries contain a ``NaN`` is
``None`` (never ``NaN``); entries a metric does not use may be ``NaN``. ACC
needs only row ``T``. With ``T == 1`` there is no earlier experience, so BWT,
FWT and forgetting are ``None``; ACC and average incremental accuracy are
defined (and equal). Infinite entries are rejected with ``ValueError``.

All metrics are returned as Python ``float`` (or ``None``), on the same scale
as ``R`` (fractions or percentages, whichever the caller used).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "backward_transfer",
    "forward_transfer",
    "average_forgetting",
    "average_incremental_accuracy",
    "compute_metrics",
]


def _as_matrix(R) -> np.ndarray:
    """Validate ``R`` and return it as a float array of shape (T+1, T), T >= 1."""
    try:
        arr = np.asarray(R, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"accuracy matrix must be numeric with shape (T+1, T), T >= 1: {exc}"
        ) from None
    if arr.ndim != 2:
        raise ValueError(
            f"accuracy matrix must be 2-D with shape (T+1, T), T >= 1; "
            f"got {arr.ndim}-D array of shape {arr.shape}"
        )
    rows, cols = arr.shape
    if cols < 1 or rows != cols + 1:
        raise ValueError(
            f"accuracy matrix must have shape (T+1, T) with T >= 1 "
            f"(row 0 = before training, rows 1..T = after each experience); "
            f"got shape {arr.shape}"
        )
    if np.isinf(arr).any():
        raise ValueError("accuracy matrix contains infinite values; use NaN for 'not measured'")
    return arr


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of ``values`` as a Python float, or None if any value is NaN."""
    if values.size == 0 or np.isnan(values).any():
        return None
    return float(np.mean(values))


def _accuracy(R: np.ndarray) -> float | None:
    T = R.shape[1]
    return _mean_or_none(R[T, :])  # a[T, j], j = 1..T  ->  R[T, 0..T-1]


def _backward_transfer(R: np.ndarray) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    cols = np.arange(T - 1)          # c = 0..T-2  <->  j = c + 1 = 1..T-1
    final = R[T, cols]               # a[T, j]  = R[T, j-1]
    just_trained = R[cols + 1, cols]  # a[j, j] = R[j, j-1]  (sub-diagonal)
    # mean over the T-1 terms = the paper's 1/(T-1) normalisation
    return _mean_or_none(final - just_trained)


def _forward_transfer(R: np.ndarray) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    cols = np.arange(1, T)           # c = 1..T-1  <->  j = c + 1 = 2..T
    before = R[cols, cols]           # a[j-1, j] = R[j-1, j-1] = R[c, c]  (numpy diagonal)
    init = R[0, cols]                # a[0, j]   = R[0, j-1]   = R[0, c]
    return _mean_or_none(before - init)  # T-1 terms


def _average_forgetting(R: np.ndarray) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    # rows l = 1..T-1 (final row T excluded), columns c = 0..T-2 (j = 1..T-1)
    earlier = R[1:T, : T - 1]
    if np.isnan(earlier).any():
        return None
    best = earlier.max(axis=0)       # max_{l=1..T-1} a[l, j]
    final = R[T, : T - 1]            # a[T, j]
    return _mean_or_none(best - final)  # T-1 terms; may be negative (not clipped)


def _average_incremental_accuracy(R: np.ndarray) -> float | None:
    T = R.shape[1]
    step_means = []
    for i in range(1, T + 1):        # row i = after training experiences 1..i
        m = _mean_or_none(R[i, :i])  # a[i, j], j = 1..i  ->  R[i, 0..i-1]
        if m is None:
            return None
        step_means.append(m)
    return float(np.mean(step_means))


def accuracy(R) -> float | None:
    """ACC: mean final accuracy over all experiences, ``mean_j R[T, j]``."""
    return _accuracy(_as_matrix(R))


def backward_transfer(R) -> float | None:
    """BWT (GEM paper): ``1/(T-1) * sum_{j=1..T-1} (a[T, j] - a[j, j])``; None if T == 1."""
    return _backward_transfer(_as_matrix(R))


def forward_transfer(R) -> float | None:
    """FWT (GEM paper): ``1/(T-1) * sum_{j=2..T} (a[j-1, j] - a[0, j])``; None if T == 1."""
    return _forward_transfer(_as_matrix(R))


def average_forgetting(R) -> float | None:
    """Average forgetting F_T (Chaudhry et al. 2018); max over rows 1..T-1; None if T == 1."""
    return _average_forgetting(_as_matrix(R))


def average_incremental_accuracy(R) -> float | None:
    """Average incremental accuracy (iCaRL): ``1/T * sum_i mean_{j<=i} a[i, j]``."""
    return _average_incremental_accuracy(_as_matrix(R))


def compute_metrics(R) -> dict[str, float | None]:
    """All metrics as a dict with keys acc, bwt, fwt, forgetting, avg_inc_acc."""
    arr = _as_matrix(R)
    return {
        "acc": _accuracy(arr),
        "bwt": _backward_transfer(arr),
        "fwt": _forward_transfer(arr),
        "forgetting": _average_forgetting(arr),
        "avg_inc_acc": _average_incremental_accuracy(arr),
    }
