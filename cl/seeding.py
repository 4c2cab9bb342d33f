"""Independent random streams derived from one seed.

`numpy.random.SeedSequence` spawns statistically independent children; each
purpose (scenario draws, weight initialisation, the strategy's draws) takes its
own child, so changing how many numbers one purpose draws never shifts another.
"""
from __future__ import annotations

import numpy as np

#: Spawn key of the training run's streams (init, strategy); the scenario uses the root's children.
RUN_STREAMS = (0x52554E,)


def spawn_seeds(seed: int, n: int, key: tuple[int, ...] = ()) -> list[int]:
    """`n` independent non-negative 63-bit seeds derived from `seed` (and the spawn `key`)."""
    root = np.random.SeedSequence(seed, spawn_key=key)
    return [int(child.generate_state(1, np.uint64)[0] >> 1) for child in root.spawn(n)]
