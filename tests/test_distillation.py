"""LwF, iCaRL, DER and DER++: their loss terms on hand-made tensors, and the strategies."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from cl.config import load_experiment
from cl.runner import build_scenario, load_datasets
from cl.strategies.distillation import distillation, nearest_mean_scores
from cl.strategy import Batch
from tests.helpers import digits_experiment, run, strategy_for



def first_batch(strategy, exp, n=10):
    idx = torch.arange(n)
    raw = exp.inputs(idx)
    return Batch(strategy.prepare(raw), exp.y[idx], exp.task_ids(idx), raw)


# ---------------------------------------------------------------- the terms by hand


def test_distillation_term_by_hand():
    # Teacher logits (0, 2 ln 3) at T = 2 give (1/4, 3/4); a student at (0, 0) gives (1/2, 1/2):
    # -(1/4 ln 1/2 + 3/4 ln 1/2) = ln 2.
    teacher = torch.tensor([[0.0, 2 * math.log(3)]])
    assert distillation(torch.zeros(1, 2), teacher, 2.0).item() == pytest.approx(math.log(2))
    # A student equal to the teacher: the entropy of (1/4, 3/4).
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert distillation(teacher.clone(), teacher, 2.0).item() == pytest.approx(entropy)
    # The mean over samples, not the sum.
    both = distillation(torch.zeros(2, 2), teacher.repeat(2, 1), 2.0)
    assert both.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("temperature", [0.5, 0.99, 1.0, 2.0])
def test_masked_distillation_is_over_the_masked_classes_at_every_temperature(temperature):
    """A third, masked class changes nothing, and gets no gradient (at T < 1 the mask used to give NaN)."""
    teacher = torch.tensor([[0.0, 2 * math.log(3), 5.0]])
    student = torch.tensor([[0.3, -0.2, 7.0]], requires_grad=True)
    mask = torch.tensor([True, True, False])
    value = distillation(student, teacher, temperature, mask)
    assert value.item() == pytest.approx(distillation(student[:, :2], teacher[:, :2], temperature).item())
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 2] == 0


def test_nearest_mean_of_exemplars_by_hand():
    means = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    features = torch.tensor([[3.0, 0.5], [0.2, 2.0], [-5.0, -1.0], [0.0, -1.0]])
    scores = nearest_mean_scores(features, means, torch.tensor([True, True, False]))
    assert scores.argmax(1).tolist() == [0, 1, 1, 0]  # class 2 has no exemplars: never chosen
    # Scores are minus the distance between the normalised feature and the mean.
    assert scores[0, 0].item() == pytest.approx(-(F.normalize(features[:1], dim=1) - means[0]).norm().item())


# ---------------------------------------------------------------- LwF


@pytest.mark.parametrize("task_labels, multi_head", [(False, False), (True, False), (True, True)],
                         ids=["class-il", "task-il-single-head", "task-il-multi-head"])
def test_lwf_loss_is_cross_entropy_plus_alpha_times_the_distillation(task_labels, multi_head):
    cfg = digits_experiment([{"name": "lwf", "alpha": 0.7, "temperature": 2.0}], n_experiences=3,
                            task_labels=task_labels, multi_head=multi_head)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    strategy.fit(scenario.train[1])
    exp = scenario.train[2]
    strategy.experience = exp
    batch = first_batch(strategy, exp)
    out = strategy.loss(batch)
    # The teacher is the model as it was after experience 2, a separate module.
    assert all(torch.equal(p, q) for p, q in zip(strategy.teacher.parameters(), strategy.model.parameters()))
    assert strategy.teacher is not strategy.model
    model = strategy.model
    heads = model(batch.x, all_heads=True)
    old = [scenario.train[k].classes for k in range(2)]
    if task_labels:  # one term per old task, each over its own classes (and head)
        expected_kd = sum(distillation(heads[:, k if multi_head else 0][:, c], heads[:, k if multi_head else 0][:, c], 2.0)
                          for k, c in enumerate(old))
    else:  # one distribution over all old classes
        c = torch.cat(old)
        expected_kd = distillation(heads[:, 0][:, c], heads[:, 0][:, c], 2.0)
    ce = F.cross_entropy(strategy.forward(batch.x, batch.t), batch.y)
    assert out.terms["distillation"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((ce + 0.7 * expected_kd).item(), rel=1e-5)


def test_lwf_has_no_distillation_on_the_first_experience_and_counts_its_teacher():
    cfg = digits_experiment([{"name": "lwf"}], n_experiences=2)
    strategy, scenario = strategy_for(cfg)
    strategy.experience = scenario.train[0]
    assert strategy.loss(first_batch(strategy, scenario.train[0])).terms == {}
    n_params = sum(p.numel() for p in strategy.model.parameters())
    assert strategy.memory_bytes() == 4 * n_params + strategy.stream.n_tasks * strategy.stream.n_classes


# ---------------------------------------------------------------- iCaRL


def test_icarl_targets_are_labels_for_new_classes_and_teacher_outputs_for_old_ones():
    cfg = digits_experiment([{"name": "icarl", "buffer_size": 50}], n_experiences=3)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    exp = scenario.train[1]
    strategy.experience = exp
    strategy.current_classes = torch.zeros_like(strategy.seen_classes)
    strategy.current_classes[exp.classes] = True
    batch = first_batch(strategy, exp)
    out = strategy.loss(batch)
    seen = torch.cat([scenario.train[0].classes, exp.classes]).sort().values
    logits = strategy.model(batch.x, batch.t)
    target = F.one_hot(batch.y, 10).float()
    old = scenario.train[0].classes
    target[:, old] = torch.sigmoid(strategy.teacher(batch.x, batch.t)[:, old])
    expected = F.binary_cross_entropy_with_logits(logits[:, seen], target[:, seen])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # 50 exemplars over the 4 classes seen: 12 each, chosen by herding.
    assert len(old) == 4
    assert torch.bincount(strategy.buffer.fields["y"][: len(strategy.buffer)], minlength=10)[old].tolist() == [12] * 4


def test_icarl_class_means_are_the_normalised_means_of_exemplar_features():
    cfg = digits_experiment([{"name": "icarl", "buffer_size": 40}], n_experiences=2)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    x, y = strategy.buffer.fields["x"][: len(strategy.buffer)], strategy.buffer.fields["y"][: len(strategy.buffer)]
    with torch.no_grad():
        strategy.model.eval()
        features = F.normalize(strategy.model.features(strategy.prepare(x, train=False)), dim=1)
    for c in scenario.train[0].classes.tolist():
        expected = F.normalize(features[y == c].mean(0), dim=0)
        assert torch.allclose(strategy.class_means[c], expected, atol=1e-6)
    assert strategy.seen_classes.sum() == len(scenario.train[0].classes)
    # What iCaRL keeps: 40 exemplars (64 float32 pixels, label, task id), the teacher, the class means.
    n_params = sum(p.numel() for p in strategy.model.parameters())
    assert strategy.memory_bytes() == 40 * (64 * 4 + 8 + 8) + 4 * n_params + 10 * 64 * 4 + 10


# ---------------------------------------------------------------- DER, DER++


def test_der_stores_the_logits_of_the_training_forward_pass():
    cfg = digits_experiment([{"name": "der", "buffer_size": 50, "alpha": 0.5}], n_experiences=2, lr=0.5)
    strategy, scenario = strategy_for(cfg)
    exp = scenario.train[0]
    strategy.experience = exp
    strategy._prepare_optimizer()
    batch = first_batch(strategy, exp)
    before = copy.deepcopy(strategy.model)
    strategy.train_step(batch)
    stored = strategy.buffer.fields["logits"][:10]
    with torch.no_grad():
        assert torch.allclose(stored, before(batch.x, batch.t))  # the pass that trained on the batch
        assert not torch.allclose(stored, strategy.model(batch.x, batch.t), atol=1e-3)  # not a recomputation


def test_der_and_der_pp_losses_by_their_terms():
    cfg = digits_experiment([{"name": "der_pp", "buffer_size": 50, "alpha": 0.3, "beta": 0.6,
                              "replay_batch_size": 8}], n_experiences=2)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    exp = scenario.train[1]
    strategy.experience = exp
    batch = first_batch(strategy, exp)
    state = strategy.generator.get_state()
    out = strategy.loss(batch)
    strategy.generator.set_state(state)  # the same two buffer draws again
    first, second = strategy.buffer.sample(8), strategy.buffer.sample(8)
    assert not torch.equal(first.index, second.index)  # independent draws
    with torch.no_grad():
        mse = ((strategy.model(strategy.prepare(first["x"]), first["t"]) - first["logits"]) ** 2).mean()
        ce2 = F.cross_entropy(strategy.model(strategy.prepare(second["x"]), second["t"]), second["y"])
        ce = F.cross_entropy(strategy.model(batch.x, batch.t), batch.y)
    assert out.terms["logit_mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert out.terms["replay_ce"].item() == pytest.approx(ce2.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((ce + 0.3 * mse + 0.6 * ce2).item(), rel=1e-5)


def test_der_memory_counts_inputs_labels_task_ids_and_logits():
    record = run(digits_experiment([{"name": "der", "buffer_size": 60}], n_experiences=2))
    assert record.budgets.memory_bytes == 60 * (64 * 4 + 8 + 8 + 10 * 4)


# ---------------------------------------------------------------- learning and forgetting


def test_replay_and_distillation_strategies_beat_fine_tuning_in_class_il():
    cfg = digits_experiment([{"name": "naive"}, {"name": "icarl", "buffer_size": 100},
                             {"name": "der", "buffer_size": 100, "alpha": 3.0},
                             {"name": "der_pp", "buffer_size": 100, "alpha": 1.0, "beta": 1.0}], epochs=2)
    naive, icarl, der, der_pp = (run(cfg, index=i).metrics for i in range(4))
    assert naive.acc < 0.25
    for m in (icarl, der, der_pp):
        assert m.acc > naive.acc + 0.3 and m.forgetting < naive.forgetting - 0.3


def test_icarl_refuses_domain_incremental_streams():
    cfg = digits_experiment([{"name": "icarl"}], name="permuted", n_experiences=2)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    from cl.errors import UserError
    from cl.runner import check_compatibility, input_pipeline
    with pytest.raises(UserError, match="supports class-il, task-il"):
        check_compatibility(cfg, scenario, input_pipeline(cfg, scenario, torch.device("cpu")))


@pytest.mark.parametrize("options, message", [
    ({"name": "blurry", "overlap": 0.1}, "needs each class in one experience only, but classes recur"),
    ({"buffer_size": 9}, "buffer_size 9 leaves the last of the 10 classes none; give at least buffer_size = 10"),
])
def test_icarl_refuses_recurring_classes_and_a_buffer_smaller_than_the_classes(options, message):
    """A blurry stream is class-IL, but its classes recur: iCaRL treated them all as old after the first
    experience (rows [0.87, 0.74, 0.5] three times); with fewer slots than classes it kept no exemplars."""
    from cl.errors import UserError
    from cl.runner import check_compatibility, input_pipeline
    buffer = {"buffer_size": options.pop("buffer_size")} if "buffer_size" in options else {}
    cfg = digits_experiment([{"name": "icarl", **buffer}], n_experiences=3, **options)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    assert scenario.stream_info((64,)).classes_recur == ("overlap" in options)
    with pytest.raises(UserError, match=re.escape(message)):
        check_compatibility(cfg, scenario, input_pipeline(cfg, scenario, torch.device("cpu")))


# ---------------------------------------------------------------- reproduction (slow)


@pytest.mark.slow
def test_split_fashion_mnist_class_il_orderings_over_three_seeds():
    """The DER protocol on Split Fashion-MNIST class-IL (buffer 200), seeds 0-2.

    DER++ beats ER at the same buffer, as published. iCaRL beats fine-tuning and forgets less than
    ER, but its accuracy stays below ER's (0.625 against 0.717 here, flat from buffer 200 to 500):
    the DER paper's own S-MNIST numbers show the same (iCaRL 70.5 / 70.1 against ER 80.4 / 86.1,
    docs/reference.md); iCaRL beats ER only in its CIFAR results. With its own head instead of
    the nearest mean iCaRL drops to 0.38, so the nearest-mean classifier is doing its job.
    """
    cfg = load_experiment("experiments/der_split_fashion_mnist_class_il.toml",
                          only_strategies=["naive", "er_200", "der_pp_200", "icarl_200"])
    runs = {c.label: [run(cfg, seed=s, index=i).metrics for s in (0, 1, 2)] for i, c in enumerate(cfg.strategies)}
    acc = {k: sum(m.acc for m in v) / 3 for k, v in runs.items()}
    forgetting = {k: sum(m.forgetting for m in v) / 3 for k, v in runs.items()}
    assert acc["der_pp_200"] > acc["er_200"]
    assert min(acc["er_200"], acc["der_pp_200"], acc["icarl_200"]) > acc["naive"] + 0.3
    assert forgetting["icarl_200"] < forgetting["er_200"]
