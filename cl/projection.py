"""Gradient projections of GEM (Lopez-Paz & Ranzato 2017) and A-GEM (Chaudhry et al. 2019).

GEM asks for the update closest to the proposed gradient g that does not
increase the loss of any stored task: min ||z - g||^2 subject to G z >= 0, with
one row of G per task's memory gradient. Its dual has one variable per task:

    min_v  1/2 v' (G G' + ridge I) v + (G g)' v    subject to  v >= margin
    z = g + G' v

With margin 0 and no ridge this is exactly the projection; the paper's code
uses margin `memory_strength` = 0.5 (it biases the update towards the memories)
and ridge 1e-3, and so do we. The dual is tiny (tasks x tasks, at most a few
dozen), so it is solved exactly on the host in float64, by `quadprog`
(Goldfarb-Idnani, what the paper used) when it is installed, or else by
`solve_bounded_qp`, an active-set method of our own.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Solver = Literal["auto", "quadprog", "active_set"]


def quadprog_available() -> bool:
    try:
        import quadprog  # noqa: F401
    except ImportError:
        return False
    return True


def solve_bounded_qp(P: np.ndarray, q: np.ndarray, lower: float = 0.0, tol: float = 1e-12) -> np.ndarray:
    """argmin_v 1/2 v'Pv + q'v subject to v >= lower (elementwise), P symmetric positive definite.

    Lawson and Hanson's active-set method (1974, the NNLS algorithm) written for a
    quadratic objective: variables leave their bound one at a time, in order of the
    most negative gradient, and each unconstrained solve on the free set that would
    cross a bound is cut back to it. Exact (finitely many active sets) up to the
    linear solves' rounding; at most a few dozen variables here.
    """
    n = len(q)
    c = q + P.sum(axis=1) * lower  # u = v - lower >= 0: objective 1/2 u'Pu + c'u (+ constant)
    u = np.zeros(n)
    free = np.zeros(n, dtype=bool)
    scale = max(1.0, float(np.abs(c).max(initial=0.0)))
    for _ in range(3 * n + 10):  # each outer pass frees one variable; inner passes only bind
        w = -(P @ u + c)  # the negative gradient: where moving off the bound lowers the objective
        w[free] = -np.inf
        j = int(np.argmax(w))
        if w[j] <= tol * scale:
            break
        free[j] = True
        while True:
            z = np.zeros(n)
            idx = np.flatnonzero(free)
            z[idx] = _solve(P[np.ix_(idx, idx)], -c[idx])
            if np.all(z[idx] > 0):
                u = z
                break
            crossing = idx[z[idx] <= 0]
            alpha = np.min(u[crossing] / (u[crossing] - z[crossing]))
            u = u + alpha * (z - u)
            free &= u > tol * scale
            u[~free] = 0.0
            if not free.any():
                break
    return u + lower


def _solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(A, b)
    except np.linalg.LinAlgError:  # singular (ridge 0 and parallel gradients): the least-norm solution
        return np.linalg.lstsq(A, b, rcond=None)[0]


def solve_gem_dual(P: np.ndarray, q: np.ndarray, margin: float, solver: Solver = "auto") -> np.ndarray:
    """The GEM dual: argmin_v 1/2 v'Pv + q'v subject to v >= margin."""
    if solver == "quadprog" or (solver == "auto" and quadprog_available()):
        import quadprog

        n = len(q)
        # quadprog minimises 1/2 x'Gx - a'x subject to C'x >= b.
        return quadprog.solve_qp(P, -q, np.eye(n), np.full(n, float(margin)))[0]
    return solve_bounded_qp(P, q, lower=margin)


def gem_project(g: torch.Tensor, G: torch.Tensor, margin: float = 0.5, ridge: float = 1e-3,
                solver: Solver = "auto") -> torch.Tensor:
    """The GEM update for proposed gradient `g` (p,) and memory gradients `G` (tasks, p).

    Returns g unchanged when no inner product G g is negative; otherwise g + G'v
    with v from the dual, computed in float64 like the paper's code.
    """
    dots = G @ g
    if not bool((dots < 0).any()):
        return g
    Gd = G.double()
    P = (Gd @ Gd.T).cpu().numpy()
    P = 0.5 * (P + P.T) + ridge * np.eye(len(P))
    q = (Gd @ g.double()).cpu().numpy()
    v = solve_gem_dual(P, q, margin, solver)
    return (g.double() + Gd.T @ torch.from_numpy(v).to(Gd.device)).to(g.dtype)


def agem_project(g: dict[str, torch.Tensor], g_ref: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A-GEM on gradients held per parameter (name -> tensor), as if each were one flat vector:
    g - (g.g_ref / g_ref.g_ref) g_ref when g.g_ref < 0, else g; and 1.0 where it projected, else 0.0.

    Tensor operations only, no host synchronisation and no flattening (a flat copy of the stacked
    engine's transposed weights would cost a copy each), so it runs stacked and in CUDA graphs."""
    dot = torch.stack([(g[name] * r).sum() for name, r in g_ref.items()]).sum()
    norm = torch.stack([(r * r).sum() for r in g_ref.values()]).sum()
    scale = dot.clamp(max=0) / norm.clamp(min=torch.finfo(norm.dtype).tiny)
    return {name: torch.addcmul(g[name], scale, r, value=-1) for name, r in g_ref.items()}, (dot < 0).float()
