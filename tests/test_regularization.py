"""Online EWC and SI: the penalty, the Fisher, the path integral, and the strategies."""
import pytest
import torch
import torch.nn.functional as F

from cl.config import load_experiment
from cl.strategies.regularization import quadratic_penalty
from cl.strategy import Batch
from tests.helpers import digits_experiment, resumed_beside_original, run, strategy_for



def test_ewc_penalty_and_its_closed_form_gradient_on_two_parameters_by_hand():
    params = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    anchor, fisher = {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([2.0, 3.0])}
    cfg = digits_experiment([{"name": "ewc", "ewc_lambda": 4.0}], n_experiences=2)
    strategy, _ = strategy_for(cfg)
    # lambda / 2 * sum F (theta - theta*)^2 = 4 / 2 * (2 * 1 + 3 * 1) = 10; gradient lambda F (theta - theta*)
    value, grad = quadratic_penalty(params, fisher, anchor, strategy.strength())
    assert value.item() == 10.0 and grad["w"].tolist() == [8.0, 12.0]
    (strategy.strength() * (fisher["w"] * (params["w"] - anchor["w"]) ** 2).sum()).backward()
    assert torch.equal(grad["w"], params["w"].grad)  # what autograd gives


@pytest.mark.parametrize("name", ["ewc", "si"])
def test_a_step_with_the_closed_form_penalty_equals_autograd_through_the_penalised_loss(name):
    """One training step: the objective's loss plus parameter_penalty() (its gradient added by hand) against
    backward() through loss + penalty written out, from the same parameters, anchor and importances."""
    strong = {"ewc": {"ewc_lambda": 1000.0}, "si": {"c": 50.0}}[name]  # a pull the step's check notices
    cfg = digits_experiment([{"name": name, **strong}], n_experiences=2)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    exp = scenario.train[1]
    strategy.experience = exp
    with torch.no_grad():  # move away from the anchor so the penalty pulls
        for p in strategy.model.parameters():
            p += 0.05
    raw = exp.inputs(torch.arange(10))
    batch = Batch(strategy.prepare(raw), exp.y[:10], exp.task_ids(torch.arange(10)), raw)
    params = dict(strategy.model.named_parameters())
    penalty = strategy.strength() * sum((strategy.weight[n] * (p - strategy.anchor[n]) ** 2).sum()
                                        for n, p in params.items())
    loss = F.cross_entropy(strategy.forward(batch.x, batch.t), batch.y) + penalty
    expected_grad = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    expected_step = {n: p.detach() - cfg.training.lr * expected_grad[n] for n, p in params.items()}
    out = strategy.train_step(batch)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert penalty.item() > 0.1 and out.terms["penalty"].item() == pytest.approx(penalty.item(), rel=1e-5)
    for n, p in params.items():
        assert torch.allclose(p.detach(), expected_step[n], atol=1e-6)


@pytest.mark.parametrize("model, options, linear", [
    ("mlp", {}, True),  # (d^2)^T (x^2) per linear layer
    ("mlp", {"task_labels": True}, True),  # ... through the task-IL logit mask
    ("mlp", {"task_labels": True, "multi_head": True}, False),  # heads see subsets: per-sample gradients
    ("cnn", {}, False),  # convolutions: per-sample gradients
])
def test_ewc_fisher_is_the_mean_squared_per_sample_log_likelihood_gradient(model, options, linear, monkeypatch):
    """Both ways of computing the Fisher against one backward pass per sample."""
    import cl.strategies.regularization as regularization
    paths, fast = [], regularization.linear_squared_gradient_sums

    def spy(*args):
        sums = fast(*args)
        paths.append(sums is not None)
        return sums
    monkeypatch.setattr(regularization, "linear_squared_gradient_sums", spy)
    cfg = digits_experiment([{"name": "ewc", "fisher_batch_size": 7}], n_experiences=5, model=model, **options)
    strategy, scenario = strategy_for(cfg)
    exp = scenario.train[1]
    before = strategy.compute.state_dict()
    fisher = strategy.fisher(exp)
    assert paths[0] is linear
    assert strategy.compute.forward_samples == before["forward_samples"] + len(exp)
    assert strategy.compute.eval_forward_samples == before["eval_forward_samples"]
    expected = {name: torch.zeros_like(p) for name, p in strategy.model.named_parameters()}
    strategy.model.eval()
    for i in range(len(exp)):
        strategy.model.zero_grad()
        x = strategy.prepare(exp.inputs(torch.tensor([i])), train=False)
        F.cross_entropy(strategy.forward(x, exp.task_ids(torch.tensor([i]))), exp.y[i:i + 1]).backward()
        for name, p in strategy.model.named_parameters():
            if p.grad is not None:
                expected[name] += p.grad ** 2 / len(exp)
    for name in fisher:
        assert torch.allclose(fisher[name], expected[name], atol=1e-7, rtol=1e-4), name


def test_online_ewc_decays_the_old_fisher_and_moves_the_anchor():
    cfg = digits_experiment([{"name": "ewc", "gamma": 0.5}], n_experiences=3)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    first = {k: v.clone() for k, v in strategy.weight.items()}
    strategy.fit(scenario.train[1])
    new = strategy.fisher(scenario.train[1])
    for name, value in strategy.weight.items():
        assert torch.allclose(value, 0.5 * first[name] + new[name], atol=1e-7)
    for name, p in strategy.model.named_parameters():
        assert torch.equal(strategy.anchor[name], p.detach())


def test_si_importance_after_two_hand_made_steps():
    cfg = digits_experiment([{"name": "si", "c": 0.5, "xi": 1.0}], n_experiences=2)
    strategy, scenario = strategy_for(cfg)
    strategy.experience = scenario.train[0]
    params = strategy.trained_parameters()
    start = {name: p.detach().clone() for name, p in params.items()}
    steps = [(1.0, -0.1), (0.5, -0.2)]  # (gradient, change) of every parameter at each step
    for g, d in steps:
        for p in params.values():
            p.grad = torch.full_like(p, g)
        strategy.adjust_gradients(None, None)
        with torch.no_grad():
            for p in params.values():
                p += d
        strategy.after_step(None, None)
    strategy.end_experience(scenario.train[0])
    # omega = -(1 * -0.1 + 0.5 * -0.2) = 0.2; total change -0.3: Omega = 0.2 / (0.09 + 1).
    for name, omega in strategy.weight.items():
        assert torch.allclose(omega, torch.full_like(omega, 0.2 / 1.09))
        assert torch.allclose(strategy.anchor[name], start[name] - 0.3)
        assert torch.all(strategy.path[name] == 0)


def test_si_path_integral_keeps_the_gradient_before_clipping_in_every_experience():
    """Clipping (training.grad_clip_norm) scales .grad in place after adjust_gradients; the first experience's
    path integral used to hold .grad itself, so its gradient was clipped while later experiences' were not."""
    cfg = digits_experiment([{"name": "si"}], n_experiences=2, grad_clip_norm=0.01)
    strategy, scenario = strategy_for(cfg)
    strategy.experience = scenario.train[0]
    for p in strategy.trained_parameters().values():
        p.grad = torch.full_like(p, 1.0)
    strategy.adjust_gradients(None, None)
    for p in strategy.trained_parameters().values():
        p.grad.mul_(0.001)  # what clipping does
    assert all(torch.all(g == 1.0) for g in strategy._task_grad.values())


def test_si_path_integral_uses_the_task_gradient_without_the_penalty():
    cfg = digits_experiment([{"name": "si", "c": 2.0}], n_experiences=2)
    strategy, scenario = strategy_for(cfg)
    strategy.fit(scenario.train[0])
    exp = scenario.train[1]
    strategy.experience = exp
    with torch.no_grad():  # move away from the anchor so the penalty has a gradient
        for p in strategy.model.parameters():
            p += 0.05
    raw = exp.inputs(torch.arange(10))
    batch = Batch(strategy.prepare(raw), exp.y[:10], exp.task_ids(torch.arange(10)), raw)
    strategy.model.zero_grad()
    F.cross_entropy(strategy.forward(batch.x, batch.t), batch.y).backward()
    task_grad = {n: p.grad.clone() for n, p in strategy.model.named_parameters()}
    strategy.model.zero_grad()
    out = strategy.loss(batch)
    out.loss.backward()
    strategy._add_parameter_penalty(out)  # as train_step does: .grad is the penalised loss's gradient
    assert out.terms["penalty"].item() > 0
    strategy.adjust_gradients(batch, out)
    for name, g in task_grad.items():
        assert torch.allclose(strategy._task_grad[name], g, atol=1e-6)


@pytest.mark.parametrize("name", ["ewc", "si"])
def test_ewc_and_si_keep_parameter_copies_and_forget_less_on_permuted_digits(name):
    options = {"ewc": {"ewc_lambda": 20.0}, "si": {"c": 1.0}}[name]
    cfg = digits_experiment([{"name": "naive"}, {"name": name, **options}], n_experiences=4, name="permuted",
                            lr=0.1, hidden=[100, 100])
    naive, regularised = run(cfg, index=0), run(cfg, index=1)
    assert regularised.metrics.bwt > naive.metrics.bwt + 0.05
    n_params = 64 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    copies = {"ewc": 2, "si": 3}[name]  # anchor and Fisher; SI also the running path integral
    assert regularised.budgets.memory_bytes == copies * 4 * n_params


@pytest.mark.parametrize("strategy", [
    {"name": "ewc"}, {"name": "si"}, {"name": "lwf"}, {"name": "icarl", "buffer_size": 40},
    {"name": "der", "buffer_size": 40}, {"name": "der_pp", "buffer_size": 40},
    {"name": "gem", "memory_per_task": 20}, {"name": "agem", "memory_per_task": 20, "sample_size": 16},
], ids=lambda s: s["name"])
def test_every_new_strategy_continues_exactly_from_a_checkpoint(strategy):
    """What each keeps (anchors, Fishers, importances, teachers, buffers with logits, memories)
    is all in its state_dict: a restored copy trains on exactly like the original."""
    original, restored = resumed_beside_original(digits_experiment([strategy], n_experiences=3))
    for p, q in zip(original.model.parameters(), restored.model.parameters()):
        assert torch.equal(p, q)
    assert original.compute == restored.compute
    assert original.logs.as_lists(3) == restored.logs.as_lists(3)
    assert original.memory_bytes() == restored.memory_bytes()


@pytest.mark.slow
def test_split_fashion_mnist_task_il_ewc_si_and_lwf_beat_fine_tuning():
    """Three seeds of the DER protocol on Split Fashion-MNIST task-IL."""
    cfg = load_experiment("experiments/der_split_fashion_mnist_task_il.toml",
                          only_strategies=["naive", "ewc", "si", "lwf"])
    acc = {c.label: sum(run(cfg, seed=s, index=i).metrics.acc for s in (0, 1, 2)) / 3
           for i, c in enumerate(cfg.strategies)}
    for name in ("ewc", "si", "lwf"):
        assert acc[name] > acc["naive"], acc
