"""CUDA-graph train steps (`cl run --cuda-graphs`; off by default, CUDA only).

A training step of a small model at batch 10 is a few dozen tiny kernels, and on
a GPU the time goes into launching them. A CUDA graph records the kernels of one
step once and replays them with one launch. What a replay can redo is only
device work on fixed addresses with fixed shapes, so the step is split:

    eager, every step:  draw (random draws, buffer samples: host-side counters),
                        after_step (buffer updates), logs, the loss monitor
    graphed:            the objective, backward, gradient clipping and the
                        optimizer update, on static copies of the step's inputs

`StepGraphs` keeps one graph per input signature (the names, shapes and dtypes of
the drawn tensors). A signature's first `warmup` steps run eagerly (they also
create the optimizer's state); the next one is captured and every later one
replayed. A signature that occurs fewer times (the last, shorter batch of an
experience; the first step before a buffer has anything to replay) simply stays
eager. Compute counts are those of the signature's last eager step, added at
each replay (what the capture's own Python pass counted is taken back out).
Strategies that read or rewrite gradients on the host (`adjust_gradients`: GEM's
quadratic program, SI's bookkeeping) are not graphed; A-GEM's projection
(`project_gradient`, tensor operations) is part of the graphed step.

Graphs live for one experience: `release()` drops them when it ends (their
memory pools go back at once), and Python's garbage collector is paused while a
step is captured. Both for one reason, seen on an H100: a graph left in a
reference cycle was destroyed by a collection that happened to run inside the
next experience's capture, and destroying a graph is not allowed while a stream
captures, so that capture failed and the run stopped.

The capture itself needs a GPU: `capture` is injectable, and the CPU tests drive
the bookkeeping above with a capture that replays the step eagerly; the `cuda`
tests in tests/test_stacking.py compare graphed and eager runs on a GPU.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

Inputs = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]
Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def signature(inputs: Inputs) -> Signature:
    return tuple((name, tuple(value.shape), value.dtype) for name, value in inputs.items())


class Captured:
    """One recorded step: static inputs, the outputs it writes, and how to replay it."""

    def __init__(self, static: Inputs, outputs: Outputs, replay: Callable[[], None]):
        self.static, self.outputs, self.replay = static, outputs, replay


def cuda_capture(step: Callable[[Inputs], Outputs], inputs: Inputs) -> Captured:
    """Record `step` on static copies of `inputs` as a CUDA graph (PyTorch's whole-step recipe: the
    caller has run warm-up steps eagerly and left the gradients as None, so backward allocates them
    in the graph's memory pool). Capturing does not run the step: the caller replays it once. The capture
    runs with the inputs' GPU as the current device: `torch.cuda.graph` captures on a stream of the
    current device, and a step on another GPU (`--device cuda:1`) would not be recorded."""
    with torch.cuda.device(next(iter(inputs.values())).device):
        static = {name: value.clone() for name, value in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()  # a collection inside the capture could destroy another graph (see the module doc)
        try:
            with torch.cuda.graph(graph):
                outputs = step(static)
        finally:
            if collecting:
                gc.enable()
    return Captured(static, outputs, graph.replay)


class StepGraphs:
    """Graphs of a strategy's device step, one per input signature (see the module doc)."""

    def __init__(self, step: Callable[[Inputs], Outputs], counts: Callable[[], tuple[int, int]],
                 add_counts: Callable[[int, int], None], warmup: int = 3,
                 capture: Callable[[Callable[[Inputs], Outputs], Inputs], Captured] | None = None):
        self.step, self.counts, self.add_counts = step, counts, add_counts
        self.warmup, self.capture = warmup, capture if capture is not None else cuda_capture
        self.graphs: dict[Signature, tuple[Captured, tuple[int, int]]] = {}
        self.seen: dict[Signature, int] = {}
        self.step_counts: dict[Signature, tuple[int, int]] = {}  # samples of the signature's last eager step
        self.captured = 0  # signatures captured (graphs stay countable after release)
        self.replayed = 0
        self.eager = 0

    def __call__(self, inputs: Inputs) -> Outputs:
        key = signature(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.warmup:
                self.eager += 1
                before = self.counts()
                outputs = self.step(inputs)
                after = self.counts()
                self.step_counts[key] = (after[0] - before[0], after[1] - before[1])
                return outputs
            before = self.counts()
            captured = self.capture(self.step, inputs)
            after = self.counts()
            self.add_counts(before[0] - after[0], before[1] - after[1])  # capture runs no step
            entry = self.graphs[key] = (captured, self.step_counts[key])
            self.captured += 1
        captured, (forward, backward) = entry
        for name, value in inputs.items():
            captured.static[name].copy_(value)
        before = self.counts()
        captured.replay()
        after = self.counts()  # a CUDA replay runs no Python and counts nothing; a stand-in may
        self.add_counts(forward + before[0] - after[0], backward + before[1] - after[1])
        self.replayed += 1
        # The graph overwrites its outputs at the next replay; hooks and logs keep what they are given.
        return {name: value.detach().clone() for name, value in captured.outputs.items()}

    def release(self) -> None:
        """Drop the graphs and their static tensors now (at the end of the experience), not whenever
        the garbage collector gets to them."""
        self.graphs.clear()

    def summary(self) -> str:
        """One line for the log: what was replayed and what ran eagerly."""
        return (f"cuda graphs: {self.captured} step shape(s) captured, {self.replayed} steps replayed, "
                f"{self.eager} eager (warm-up, and shapes too rare to capture: the last, shorter batch)")
