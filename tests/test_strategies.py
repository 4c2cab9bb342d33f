"""Strategies learn, the ones that claim to reduce forgetting do, and the strategy API keeps its promises."""
import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cl.strategy
import cl.training
from cl.config import build_experiment, load_experiment
from cl.errors import UserError
from cl.params import param
from cl.runner import build_scenario, build_strategy, load_datasets
from cl.strategy import StepOutput, Strategy
from tests.helpers import (CPU, DEVICES, digits_experiment, register_temporarily, resumed_beside_original, run,
                           strategy_for)

# ---------------------------------------------------------------- learning and forgetting


def test_naive_learns_a_single_experience():
    record = run(digits_experiment([{"name": "naive"}], n_experiences=1, epochs=3))
    assert record.matrix[0][0] < 0.3  # untrained: about chance (0.1)
    assert record.metrics.acc > 0.85


@pytest.mark.parametrize("buffer", ["reservoir", "class_balanced"])
def test_er_reduces_forgetting_compared_with_naive(buffer):
    cfg = digits_experiment([{"name": "naive"}, {"name": "er", "buffer_size": 100, "buffer": buffer}], epochs=3)
    naive, er = run(cfg, index=0).metrics, run(cfg, index=1).metrics
    # Fine-tuning in class-IL forgets almost everything: only the last experience is right.
    assert naive.acc < 0.3 and naive.forgetting > 0.8
    assert er.acc > naive.acc + 0.3
    assert er.forgetting < naive.forgetting - 0.4


def test_class_balanced_er_keeps_samples_of_both_domains_of_a_domain_incremental_stream():
    """The classes recur in the second experience: its samples must get into the buffer (the old
    class-balanced buffer kept every slot for the first experience's samples)."""
    from cl.config import build_experiment

    raw = {"name": "di", "dataset": [{"name": "digits"}, {"name": "digits", "split_seed": 1}],
           "scenario": {"name": "domain_incremental"}, "model": {"name": "mlp", "hidden": [32]},
           "training": {"batch_size": 32, "lr": 0.05},
           "strategies": [{"name": "er", "buffer_size": 100, "buffer": "class_balanced"}]}
    strategy, scenario = strategy_for(build_experiment(raw))
    for exp in scenario.train:
        strategy.fit(exp)
    t = strategy.buffer.fields["t"][: len(strategy.buffer)]
    assert len(t) == 100
    assert 30 <= int((t == 1).sum()) <= 70  # about half: 1437 samples of each domain were offered


def test_joint_is_measured_only_at_init_and_at_the_end():
    record = run(digits_experiment([{"name": "joint"}], epochs=3))
    matrix = record.matrix
    assert all(v is None for row in matrix[1:-1] for v in row)
    assert all(v is not None for v in matrix[0] + matrix[-1])
    assert record.metrics.acc > 0.85
    assert record.metrics.bwt is None and record.metrics.forgetting is None


def test_cumulative_barely_forgets():
    record = run(digits_experiment([{"name": "cumulative"}], epochs=3))
    assert record.metrics.acc > 0.85
    assert record.metrics.forgetting < 0.1
    # It keeps every training sample: 1437 digits of 64 float32 pixels, label and task id.
    assert record.budgets.memory_bytes == 1437 * (64 * 4 + 8 + 8)


def test_compute_and_memory_budgets_are_exact():
    cfg = digits_experiment([{"name": "naive"}, {"name": "er", "buffer_size": 50, "replay_batch_size": 4}],
                            n_experiences=5, epochs=2)
    naive, er = run(cfg, index=0), run(cfg, index=1)
    n_train = 1437
    assert naive.budgets.forward_samples == 2 * n_train
    assert naive.budgets.backward_samples == 2 * n_train
    assert naive.budgets.eval_forward_samples == 6 * 360  # 6 rows x 360 test digits
    sizes = [e["n_train"] for e in er.scenario["experiences"]]
    steps = sum(2 * -(-n // 10) for n in sizes)
    assert er.budgets.forward_samples == 2 * n_train + 4 * (steps - 1)  # no replay on the first step
    assert er.budgets.memory_bytes == 50 * (64 * 4 + 8 + 8)
    assert naive.budgets.memory_bytes == 0
    assert naive.budgets.model_bytes == 4 * (64 * 64 + 64 + 64 * 10 + 10)


def test_same_seed_same_matrix_other_seed_differs():
    cfg = digits_experiment([{"name": "er", "buffer_size": 50}], n_experiences=3)
    a, b, c = run(cfg, seed=1), run(cfg, seed=1), run(cfg, seed=2)
    assert a.matrix == b.matrix
    assert a.matrix != c.matrix


@pytest.mark.parametrize("options", [
    {"optimizer": "adam", "lr": 0.01, "optimizer_policy": "keep"},  # class-IL, reservoir buffer
    {"task_labels": True, "buffer": "class_balanced"},  # task-IL mask, per-experience buffer
], ids=["class-il-reservoir-adam-keep", "task-il-class-balanced"])
def test_state_dict_round_trip_resumes_exactly(options):
    """A strategy restored from a checkpoint after experience 1 continues exactly like the original."""
    buffer = options.pop("buffer", "reservoir")
    cfg = digits_experiment([{"name": "er", "buffer_size": 30, "buffer": buffer}], n_experiences=3, **options)
    original, restored = resumed_beside_original(cfg)
    for p, q in zip(original.model.parameters(), restored.model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(original.buffer.fields["y"], restored.buffer.fields["y"])
    assert original.compute == restored.compute
    assert torch.equal(original.generator.get_state(), restored.generator.get_state())
    assert original.logs.as_lists(3) == restored.logs.as_lists(3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["cumulative", "joint"])
def test_kept_state_restored_from_a_cpu_checkpoint_continues_on_the_run_device(device, name):
    """Checkpoints load onto the CPU; the seen data of cumulative and joint (an object with its own
    state_dict) must come back on the run's device, or the next experience joins CPU and device tensors."""
    cfg = digits_experiment([{"name": name}], n_experiences=3)
    original, restored = resumed_beside_original(cfg, device=torch.device(device))
    assert all(part.x.device.type == device for part in restored.seen.parts)
    for p, q in zip(original.model.parameters(), restored.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_run_stays_on_the_device(device):
    dev = torch.device(device)
    cfg = digits_experiment([{"name": "er", "buffer_size": 50}], n_experiences=2)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0).to(dev)
    strategy = build_strategy(cfg.strategies[0], cfg, scenario, dev, seed=0)
    strategy.fit(scenario.train[0])
    assert strategy.buffer.fields["x"].device.type == dev.type
    assert all(p.device.type == dev.type for p in strategy.model.parameters())
    record = run(cfg, device=dev)
    assert record.metrics.acc > 0.3


# ---------------------------------------------------------------- seeds


def test_runs_leave_the_global_generators_alone_and_use_independent_streams():
    before = torch.random.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2)
    strategy, scenario = strategy_for(cfg, seed=5)
    strategy.fit(scenario.train[0])
    assert torch.equal(torch.random.get_rng_state(), before)
    assert (np.random.get_state()[1] == np_before).all()
    # Neither the batch order nor the weights come straight from the run seed: each has its own stream.
    assert strategy.generator.initial_seed() != 5
    torch.manual_seed(5)
    plain = strategy.context.model.build()
    assert not torch.equal(next(plain.parameters()), next(strategy_for(cfg, seed=5)[0].model.parameters()))


# ---------------------------------------------------------------- task-IL training


def test_task_il_single_head_training_uses_the_task_id():
    """With task labels, the training loss is masked to each task's classes (GEM's practice): the
    task-IL run differs from the class-IL run's task-IL column, unless the mask is switched off."""
    class_il = run(digits_experiment([{"name": "naive"}], n_experiences=3))
    task_il = run(digits_experiment([{"name": "naive"}], n_experiences=3, task_labels=True))
    unmasked = run(digits_experiment([{"name": "naive"}], n_experiences=3, task_labels=True, task_il_mask=False))
    assert task_il.setting == "task-il"
    assert unmasked.matrix == class_il.task_il_matrix  # the old behaviour: the task id was ignored
    assert task_il.matrix != class_il.task_il_matrix


@pytest.mark.parametrize("mask", [True, False])
def test_task_il_mask_leaves_other_tasks_head_rows_untouched(mask):
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2, task_labels=True, task_il_mask=mask)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])  # classes 0-4
    old_rows = strategy.model.head.weight[:5].clone()
    strategy.fit(scenario.train[1])  # classes 5-9
    assert torch.equal(strategy.model.head.weight[:5], old_rows) == mask


def test_forward_masks_other_tasks_classes_in_task_il():
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2, task_labels=True)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    strategy.fit(scenario.train[1])
    x = scenario.train[1].inputs(slice(0, 4)).float()
    logits = strategy.forward(x, torch.tensor([0, 0, 1, 1]))
    lowest = torch.finfo(logits.dtype).min
    assert (logits[:2, 5:] == lowest).all() and (logits[:2, :5] > lowest).all()
    assert (logits[2:, :5] == lowest).all() and (logits[2:, 5:] > lowest).all()


# ---------------------------------------------------------------- what a strategy sees


def _tensors_reachable(root, limit=200_000):
    """Every tensor reachable from `root` through attributes, containers and closures."""
    seen, stack, found = set(), [root], []
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        if hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
        if hasattr(obj, "__closure__") and obj.__closure__:
            stack.extend(c.cell_contents for c in obj.__closure__)
        for name in ("func", "args", "keywords"):  # functools.partial
            if hasattr(obj, name) and not isinstance(obj, nn.Module):
                stack.append(getattr(obj, name))
    return found


def test_a_strategy_never_receives_test_data():
    received = []

    class Spy(Strategy):
        """Records everything it is handed."""

        def __init__(self, *args, **kwargs):
            received.extend(args)
            received.extend(kwargs.values())
            super().__init__(*args, **kwargs)

        def begin_experience(self, exp):
            received.append(exp)

    with register_temporarily("spy", Spy):
        cfg = digits_experiment([{"name": "spy"}], n_experiences=3)
        scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
        strategy = build_strategy(cfg.strategies[0], cfg, scenario, CPU, 0)
        for exp in scenario.train:
            strategy.fit(exp)
    test_storages = {t.untyped_storage().data_ptr() for e in scenario.test for t in (e.x, e.y)}
    reachable = _tensors_reachable([received, strategy])
    assert reachable  # the walk does find tensors (weights, training data)
    leaked = [t.shape for t in reachable if t.untyped_storage().data_ptr() in test_storages]
    assert leaked == []
    assert not any(e is exp for e in scenario.test for exp in received)


# ---------------------------------------------------------------- hooks: step outputs, logs, ownership


@dataclasses.dataclass
class LogitParams:
    alpha: float = param(0.5, "weight of the logit-matching term")


class LogitReplaySpy(Strategy):
    """DER-like: stores the training logits from after_step and replays them."""

    Params = LogitParams
    kept = ("stored",)

    def setup(self):
        self.stored = []
        self.after_calls = 0

    def loss(self, batch):
        logits = self.forward(batch.x, batch.t)
        ce = F.cross_entropy(logits, batch.y)
        terms = {"ce": ce}
        loss = ce
        if self.stored:
            x, z = self.stored[-1]
            match = F.mse_loss(self.forward(self.prepare(x)), z)
            terms["match"] = match
            loss = ce + self.params.alpha * match
        return StepOutput(loss, logits=logits, terms=terms)

    def after_step(self, batch, out):
        self.after_calls += 1
        assert out.logits.shape == (len(batch.y), self.stream.n_classes)
        self.stored = [(batch.raw, out.logits.detach())]


def test_step_outputs_reach_after_step_and_terms_are_logged_per_experience():
    with register_temporarily("logit_spy", LogitReplaySpy):
        cfg = digits_experiment([{"name": "logit_spy"}], n_experiences=3)
        record = run(cfg)
    assert set(record.logs) == {"ce", "match"}
    ce, match = record.logs["ce"], record.logs["match"]
    assert len(ce) == 3 and all(v is not None and v > 0 for v in ce)
    assert all(v is not None and v >= 0 for v in match)
    # memory: the last stored batch of raw digits (float32, 64 pixels) and its 10 logits
    last = record.scenario["experiences"][-1]["n_train"] % 10 or 10
    assert record.budgets.memory_bytes == last * (64 * 4 + 10 * 4)


class TwoTowers(Strategy):
    """Owns a model it builds itself, plus a second trainable module."""

    def build_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, self.stream.n_classes))

    def setup(self):
        self.scale = nn.Linear(1, 1)

    def trainable_modules(self):
        return {"model": self.model, "scale": self.scale}

    def loss(self, batch):
        logits = self.model(batch.x) * self.scale.weight.squeeze()
        return F.cross_entropy(logits, batch.y)

    def predict(self, x, task_ids):
        return self.model(x)


def test_strategy_owned_modules_are_trained_checked_budgeted_and_checkpointed():
    with register_temporarily("two_towers", TwoTowers):
        cfg = digits_experiment([{"name": "two_towers"}], n_experiences=2)
        strategy, scenario = strategy_for(cfg)
        before = strategy.scale.weight.clone()
        strategy.fit(scenario.train[0])
        assert not torch.equal(before, strategy.scale.weight)  # the optimizer trains it
        assert strategy.model_bytes() == 4 * (64 * 10 + 10 + 1 + 1)
        assert set(strategy.state_dict()["modules"]) == {"model", "scale"}
        assert strategy.compute.forward_samples == len(scenario.train[0])
        with torch.no_grad():
            strategy.scale.weight.fill_(float("nan"))
        assert not strategy.all_finite()


def test_forward_passes_of_copies_and_functional_calls_are_counted():
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2)
    strategy, scenario = strategy_for(cfg)
    x = torch.rand(7, 1, 8, 8)
    teacher = copy.deepcopy(strategy.model)
    with torch.no_grad():
        teacher(x)
    assert (strategy.compute.forward_samples, strategy.compute.backward_samples) == (7, 0)
    params = dict(strategy.model.named_parameters())
    torch.func.functional_call(strategy.model, params, (x,))
    assert (strategy.compute.forward_samples, strategy.compute.backward_samples) == (14, 7)
    strategy.model.features(x)  # a submodule entered directly counts once too
    strategy.model(x, all_heads=True)
    assert strategy.compute.forward_samples == 28
    with strategy.evaluation():
        strategy.predict(x, None)
    assert strategy.compute.eval_forward_samples == 7 and strategy.compute.forward_samples == 28


def test_a_pass_continued_through_the_head_counts_once_and_backward_only_when_it_can():
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2)
    strategy, _ = strategy_for(cfg)
    x = torch.rand(6, 1, 8, 8)
    strategy.model.head(strategy.model.features(x))  # one pass, entered through two submodules
    assert (strategy.compute.forward_samples, strategy.compute.backward_samples) == (6, 6)
    frozen = copy.deepcopy(strategy.model).requires_grad_(False)
    frozen(x)  # outside no_grad, but nothing in it can be trained: no backward pass possible
    assert (strategy.compute.forward_samples, strategy.compute.backward_samples) == (12, 6)
    per_sample = torch.func.vmap(lambda s: strategy.model(s.unsqueeze(0)))(x)  # a mapped slice is not a batch
    assert per_sample.shape == (6, 1, 10) and strategy.compute.forward_samples == 12


class KeepsATeacher(Strategy):
    """Makes a copy of its model in setup (as LwF does) and grows a new module in begin_experience."""

    def setup(self):
        self.teacher = copy.deepcopy(self.model)
        self.extra = None

    def begin_experience(self, exp):
        if exp.id == 1 and self.extra is None:
            self.extra = nn.Linear(self.stream.n_classes, self.stream.n_classes)

    def trainable_modules(self):
        return {"model": self.model} if self.extra is None else {"model": self.model, "extra": self.extra}

    def loss(self, batch):
        logits = self.forward(batch.x, batch.t)
        if self.extra is not None:
            logits = self.extra(logits)
        with torch.no_grad():
            self.teacher(batch.x)
        return F.cross_entropy(logits, batch.y)


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_setup_copies_are_counted_and_modules_added_later_are_trained(policy):
    with register_temporarily("keeps_a_teacher", KeepsATeacher):
        cfg = digits_experiment([{"name": "keeps_a_teacher"}], n_experiences=2, optimizer_policy=policy)
        strategy, scenario = strategy_for(cfg)
        strategy.fit(scenario.train[0])
        n0 = len(scenario.train[0])
        assert strategy.compute.forward_samples == 2 * n0 and strategy.compute.backward_samples == n0
        before = strategy.compute.forward_samples
        strategy.fit(scenario.train[1])  # adds `extra`, whose input continues the model's pass
        n1 = len(scenario.train[1])
        assert strategy.compute.forward_samples - before == 2 * n1
        extra = strategy.extra
        assert any(p is extra.weight for g in strategy.optimizer.param_groups for p in g["params"])
        weight = extra.weight.clone()
        strategy.fit(scenario.train[1])
        assert strategy.extra is extra and not torch.equal(weight, extra.weight)  # it is trained


def test_a_counted_model_pickles_as_its_plain_class():
    from cl.models import ContinualModel

    cfg = digits_experiment([{"name": "naive"}], n_experiences=2)
    strategy, _ = strategy_for(cfg)
    x = torch.rand(3, 1, 8, 8)
    blob = io.BytesIO()
    torch.save(strategy.model, blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=False)
    assert type(loaded) is ContinualModel and type(loaded.features) is nn.Sequential
    before = strategy.compute.forward_samples
    assert torch.equal(loaded(x), strategy.model(x))
    assert strategy.compute.forward_samples == before + 3  # only the strategy's own model counted


def test_a_strategy_sees_the_model_configuration():
    from cl.config import build_experiment

    raw = {"name": "m", "dataset": {"name": "digits"},
           "scenario": {"name": "class_incremental", "n_experiences": 2, "task_labels": True},
           "model": {"name": "mlp", "hidden": [16], "multi_head": True}, "strategies": [{"name": "naive"}]}
    strategy, _ = strategy_for(build_experiment(raw))
    spec = strategy.context.model
    assert (spec.name, spec.multi_head, spec.params.hidden) == ("mlp", True, [16])
    assert strategy.model(torch.rand(3, 1, 8, 8), all_heads=True).shape == (3, 2, 10)
    assert not strategy_for(digits_experiment([{"name": "naive"}], n_experiences=2))[0].context.model.multi_head


# ---------------------------------------------------------------- optimizer policy, freezing, groups, clipping


def test_optimizer_state_is_reset_per_experience_by_default_or_kept():
    def adam_steps(policy):
        cfg = digits_experiment([{"name": "naive"}], n_experiences=2, optimizer="adam", lr=0.001,
                                optimizer_policy=policy)
        strategy, scenario = strategy_for(cfg)
        strategy.fit(scenario.train[0])
        first = strategy.optimizer
        strategy.fit(scenario.train[1])
        state = strategy.optimizer.state[next(strategy.model.parameters())]
        return first is strategy.optimizer, int(state["step"]), -(-len(scenario.train[1]) // 10)

    same, steps, per_exp = adam_steps("reset")
    assert not same and steps == per_exp
    same, steps, per_exp = adam_steps("keep")
    assert same and steps > per_exp


def test_freeze_and_lr_scale_make_parameter_groups():
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2, freeze=["features"], lr_scale={"head": 10.0})
    strategy, scenario = strategy_for(cfg)
    frozen = [p.clone() for p in strategy.model.features.parameters()]
    strategy.fit(scenario.train[0])
    assert all(torch.equal(a, b) for a, b in zip(frozen, strategy.model.features.parameters()))
    assert not any(p.requires_grad for p in strategy.model.features.parameters())
    (group,) = strategy.optimizer.param_groups
    assert group["lr"] == pytest.approx(0.5) and len(group["params"]) == 2  # head weight and bias, lr 0.05 x 10
    with pytest.raises(UserError, match="'encoder' matches no parameter; parameter names start with features, head"):
        strategy_for(digits_experiment([{"name": "naive"}], n_experiences=2, freeze=["encoder"]))


def test_gradient_clipping_bounds_the_step():
    cfg = digits_experiment([{"name": "naive"}], n_experiences=1, lr=1.0, grad_clip_norm=0.01, batch_size=1437)
    strategy, scenario = strategy_for(cfg)
    before = [p.clone() for p in strategy.model.parameters()]
    strategy.fit(scenario.train[0])  # one full-batch step of plain SGD, lr 1
    moved = torch.cat([(p - b).flatten() for p, b in zip(strategy.model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-3)


def _sgd_trajectory(optimizer_class, monkeypatch=None, **options):
    """Parameters after 12 steps of `optimizer_class` on fixed random gradients (two groups, some gradients
    missing), and how often torch.optim.SGD's own step ran."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in [(64, 49), (64,), (10, 64), (10,)]]
    optimizer = optimizer_class([{"params": params[:2], "lr": 0.013}, {"params": params[2:], "lr": 0.13}],
                                lr=0.013, **options)
    torch_steps = []
    if monkeypatch is not None:
        torch_step = torch.optim.SGD.step
        monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **k: torch_steps.append(1) or torch_step(*a, **k))
    grads = torch.Generator().manual_seed(1)
    for i in range(12):
        optimizer.zero_grad()
        for j, p in enumerate(params):
            if (i + j) % 5:
                p.grad = torch.randn(p.shape, generator=grads)
        optimizer.step()
    return params, len(torch_steps)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.5}, {"weight_decay": 0.01}])
def test_direct_sgd_steps_exactly_as_torch_sgd_and_directly_when_plain(options, monkeypatch):
    reference, _ = _sgd_trajectory(torch.optim.SGD, **options)  # before torch's step is patched to count
    ours, torch_steps = _sgd_trajectory(cl.training.DirectSGD, monkeypatch, **options)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))  # bit for bit
    assert torch_steps == (0 if not options else 12)  # plain SGD bypasses torch's step; the rest use it


def test_direct_sgd_runs_optimizer_hooks_through_torchs_step():
    torch.manual_seed(0)
    p = nn.Parameter(torch.ones(3))
    optimizer = cl.training.DirectSGD([p], lr=0.5)
    calls = []
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    for _ in range(3):
        optimizer.zero_grad()
        p.grad = torch.ones(3)
        optimizer.step()
    assert calls == [1, 1, 1] and torch.equal(p.detach(), torch.full((3,), -0.5))


# ---------------------------------------------------------------- settings and models a strategy supports


class ClassILOnly(Strategy):
    """Declares one setting and one model."""

    supported_settings = ("class-il",)
    supported_models = ("mlp",)


def test_incompatible_setting_or_model_is_refused_before_training():
    with register_temporarily("class_il_only", ClassILOnly):
        ok = digits_experiment([{"name": "class_il_only"}], n_experiences=2)
        strategy_for(ok)
        with pytest.raises(UserError, match="supports class-il scenarios, but this one is task-il"):
            strategy_for(digits_experiment([{"name": "class_il_only"}], n_experiences=2, task_labels=True))
        with pytest.raises(UserError, match="works with models mlp, not 'cnn'"):
            strategy_for(digits_experiment([{"name": "class_il_only"}], n_experiences=2, model="cnn"))


# ---------------------------------------------------------------- augmentation reaches buffer samples


def test_er_augments_stream_and_replayed_samples_alike():
    cfg = digits_experiment([{"name": "er", "buffer_size": 20}], n_experiences=2, horizontal_flip=True,
                            crop_padding=1)
    strategy, scenario = strategy_for(cfg)
    calls = []
    pipeline = strategy.context.pipeline

    class Recording:
        def __call__(self, x, train, generator=None):
            out = pipeline(x, train, generator)
            calls.append((train, torch.equal(out, x)))  # digits are stored as float: no decoding
            return out

    strategy.context.pipeline = Recording()
    strategy.context.pipeline.params = pipeline.params
    strategy.context.pipeline.output_shape = pipeline.output_shape
    strategy.fit(scenario.train[0])
    steps = -(-len(scenario.train[0]) // 10)
    assert len(calls) == 2 * steps - 1  # a stream batch every step, a replayed batch every step but the first
    assert all(train for train, _ in calls)
    # Each call flips about half its images and shifts most of them: none comes back unchanged.
    assert sum(unchanged for _, unchanged in calls) == 0


@pytest.mark.parametrize("augment", [False, True], ids=["decoded-per-chunk", "augmented-per-batch"])
def test_batches_are_gathered_a_chunk_at_a_time_with_the_values_of_single_batches(monkeypatch, augment):
    cfg = digits_experiment([{"name": "naive"}], horizontal_flip=augment, crop_padding=int(augment))
    cfg = dataclasses.replace(cfg, scenario=build_experiment({  # permuted: each chunk goes through the transform
        "name": "permuted-digits", "dataset": {"name": "digits"}, "scenario": {"name": "permuted", "n_experiences": 2},
        "model": {"name": "mlp", "hidden": [8]}, "strategies": [{"name": "naive"}]}).scenario)
    strategy, scenario = strategy_for(cfg)
    exp = scenario.train[1]
    assert exp.transform is not None
    per_sample = exp.x[:1].numel() * exp.x.element_size() + 4 * exp.x[:1].numel()
    monkeypatch.setattr(cl.strategy, "CHUNK_BYTES", per_sample * 30 + 1)  # chunks of 3 batches of 10
    gathers = []
    inputs = exp.inputs
    monkeypatch.setattr(exp, "inputs", lambda index=None: gathers.append(len(index)) or inputs(index))
    reference = torch.Generator().manual_seed(0)
    reference.set_state(strategy.generator.get_state())
    batches = list(strategy.batches(exp))
    order = torch.randperm(len(exp), generator=reference)
    assert [len(b.y) for b in batches] == [len(idx) for idx in order.split(10)]
    assert gathers == [len(part) for part in order.split(30)]  # one gather per chunk of 3 batches
    for batch, idx in zip(batches, order.split(10)):
        raw = inputs(idx)
        assert torch.equal(batch.raw, raw) and torch.equal(batch.y, exp.y[idx]) and torch.equal(batch.t, exp.t[idx])
        # Augmented batches draw from the generator batch by batch, in the order they always did.
        assert torch.equal(batch.x, strategy.context.pipeline(raw, True, reference))


# ---------------------------------------------------------------- reproduction (slow)


@pytest.mark.slow
def test_quickstart_er_beats_naive_on_fashion_mnist():
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    cfg = load_experiment("experiments/quickstart.toml", seeds=[0])
    naive, er, joint = (run(cfg, index=i).metrics for i in range(3))
    assert naive.acc < 0.3
    assert er.acc > naive.acc + 0.4
    assert joint.acc > er.acc


@pytest.mark.slow
def test_gem_protocol_fine_tuning_reproduces_reference():
    """docs/reference.md, measured here: fine-tuning on permuted MNIST-5k, ACC 0.47 and BWT -0.32."""
    cfg = load_experiment("experiments/gem_permuted_mnist5k.toml", seeds=[0, 1])
    accs, bwts = zip(*((m.acc, m.bwt) for m in (run(cfg, seed=s).metrics for s in (0, 1))))
    assert np.mean(accs) == pytest.approx(0.47, abs=0.04)
    assert np.mean(bwts) == pytest.approx(-0.32, abs=0.04)
