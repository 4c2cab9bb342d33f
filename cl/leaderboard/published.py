"""Published results the leaderboard prints beside ours, for the board's protocols that have a comparable one.

Each entry names the board protocol (experiment name), the strategy (registered name) and, where the
paper reports several settings, the hyperparameters a run must have; its value is the paper's final
average accuracy (ACC, as a fraction), with the source and what differs from our protocol (the table's
footnote). The numbers are the ones in docs/reference.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Published:
    experiment: str
    strategy: str  # registered strategy name
    acc: float
    source: str
    differs: str
    params: tuple[tuple[str, Any], ...] = ()  # values a run's hyperparameters must have

    def matches(self, experiment: str, strategy: str, params: dict[str, Any]) -> bool:
        return (experiment, strategy) == (self.experiment, self.strategy) and \
            all(params.get(k) == v for k, v in self.params)


GEM_PAPER = "Lopez-Paz & Ranzato, GEM, NeurIPS 2017"
GEM_DIFFERS = ("1000 training images per task drawn from full MNIST (60,000), tested on its 10,000; ours draws "
               "them from MNIST-5k's 4000 training images and tests on its 1000. Same MLP 2x100, SGD, batch 10, "
               "one epoch, 20 tasks")
DER_PAPER = "Buzzega et al., DER, NeurIPS 2020, Table 2 (S-MNIST)"
DER_DIFFERS = ("full MNIST (60,000 training images), MLP 2x100, SGD, batch 10, one epoch, hyperparameters tuned per "
               "method; ours: MNIST-5k (4000 training images), MLP 2x400, Adam lr 1e-3, batch 32, 5 epochs")
HNET_PAPER = "von Oswald et al., hypernetworks, ICLR 2020 (split MNIST, HNET+ENT)"
HNET_DIFFERS = ("full MNIST, target MLP 2x400, 2000 iterations of batch 128 per task; ours: MNIST-5k, 5 epochs of "
                "batch 32 per experience")

PUBLISHED = [
    Published("rotated_mnist5k", "gem", 0.86, f"{GEM_PAPER}, Table 3 (rotations)", GEM_DIFFERS),
    Published("rotated_mnist5k", "ewc", 0.55, f"{GEM_PAPER}, Table 3 (rotations)", GEM_DIFFERS),
    Published("rotated_mnist5k", "naive", 0.53, f"{GEM_PAPER}, Table 3 (rotations, 'single')", GEM_DIFFERS),
    Published("rotated_mnist5k", "joint", 0.83, f"{GEM_PAPER}, Table 3 (rotations, 'iid')", GEM_DIFFERS),
    Published("permuted_mnist5k", "gem", 0.83, f"{GEM_PAPER}, Figure 1 (permutations, read from the figure)",
              GEM_DIFFERS),
    *[Published("split_mnist5k_class_il", name, acc, DER_PAPER, DER_DIFFERS, params)
      for name, acc, params in [
          ("joint", 0.9557, ()), ("naive", 0.1960, ()), ("ewc", 0.2046, ()), ("si", 0.1927, ()),
          ("lwf", 0.1962, ()), ("er", 0.8612, (("buffer_size", 500),)), ("icarl", 0.7010, (("buffer_size", 500),)),
          ("der", 0.9054, (("buffer_size", 500),)), ("der_pp", 0.9100, (("buffer_size", 500),))]],
    Published("split_mnist5k_class_il", "hnet", 0.7443, HNET_PAPER, HNET_DIFFERS),
]


def published_for(experiment: str, strategy: str, params: dict[str, Any]) -> Published | None:
    """The published number for this protocol, strategy and hyperparameters, if the reference has one."""
    return next((p for p in PUBLISHED if p.matches(experiment, strategy, params)), None)
