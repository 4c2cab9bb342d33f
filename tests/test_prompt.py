"""L2P and DualPrompt: key selection, the surrogate key loss, prefix attention, the frozen backbone,
learning and forgetting, checkpoints."""
import pytest
import torch

from cl.strategies.prompt import PromptPool, prefixed_block
from tests.helpers import digits_experiment, resumed_beside_original, run, strategy_for

TINY_VIT = dict(patch_size=4, width=16, depth=1, heads=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny vit pretrained on digits with `cl pretrain` (about 5 s)."""
    from cl.cli import main
    folder = tmp_path_factory.mktemp("vit")
    (folder / "pre.toml").write_text(
        f'name = "vit-digits"\nseed = 0\noutput = "{folder / "vit.pt"}"\n[dataset]\nname = "digits"\n[model]\n'
        f'name = "vit"\npatch_size = 4\nwidth = 16\ndepth = 1\nheads = 2\n'
        f'[training]\nepochs = 2\nbatch_size = 32\noptimizer = "adam"\nlr = 0.003\n')
    assert main(["pretrain", str(folder / "pre.toml"), "--no-progress", "--device", "cpu"]) == 0
    return str(folder / "vit.pt")


def tiny_vit_file(path, pretrained, body, n_experiences=5):
    """An experiment file at `path`: split digits on the tiny pretrained vit; `body` adds [training] and the
    [[strategies]]."""
    path.write_text(f'name = "p"\n[dataset]\nname = "digits"\n[scenario]\nname = "class_incremental"\n'
                    f'n_experiences = {n_experiences}\n[model]\nname = "vit"\npatch_size = 4\nwidth = 16\ndepth = 1\n'
                    f'heads = 2\ncheckpoint = "{pretrained}"\n' + body)
    return path


def l2p_experiment(checkpoint, strategies=None, **options):
    cfg = digits_experiment(strategies or [{"name": "l2p", "pool_size": 6, "top_k": 2, "prompt_length": 3}],
                            model="vit", epochs=3, optimizer="adam", lr=0.01, **options)
    cfg.model.params.__dict__.update(TINY_VIT, checkpoint=checkpoint)
    return cfg


def test_selection_is_the_top_k_keys_by_cosine_per_sample():
    pool = PromptPool(pool_size=4, length=1, width=2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]))
    query = torch.tensor([[2.0, 0.1], [-0.1, -3.0], [1.0, 1.2]])
    index, similarity = pool.select(query, top_k=2)
    assert index.tolist() == [[0, 3], [2, 0], [3, 1]]  # worked out by hand from the angles
    expected = torch.nn.functional.cosine_similarity(query[2:3], pool.keys[[3, 1]])
    torch.testing.assert_close(similarity[2], expected)


def test_the_surrogate_key_loss_pulls_selected_keys_towards_their_queries():
    torch.manual_seed(0)
    pool = PromptPool(pool_size=5, length=1, width=8)
    query = torch.randn(4, 8)
    index, similarity = pool.select(query, top_k=2)
    optimizer = torch.optim.SGD(pool.parameters(), lr=0.5)
    (-similarity.mean()).backward()
    unselected = sorted(set(range(5)) - set(index.flatten().tolist()))
    assert all(pool.keys.grad[i].abs().sum() == 0 for i in unselected)
    optimizer.step()
    after = torch.nn.functional.cosine_similarity(query.unsqueeze(1), pool.keys[index].detach(), dim=2)
    assert (after > similarity.detach()).all()


def test_the_key_loss_sums_over_the_selected_keys_and_averages_over_the_batch(pretrained):
    """The paper's Eq. 5 and the authors' code: with top_k keys per sample, a mean over the N x top_k
    similarities would weigh the term top_k times less."""
    from cl.strategy import Batch
    strategy, scenario = strategy_for(l2p_experiment(pretrained, [{"name": "l2p", "pool_size": 6, "top_k": 3,
                                                                   "prompt_length": 3, "key_lambda": 0.5}]))
    strategy.begin_experience(scenario.train[0])
    strategy.experience = scenario.train[0]
    exp = scenario.train[0]
    x, y = exp.inputs(torch.arange(8)).float(), exp.y[:8]
    output = strategy.loss(Batch(x, y, torch.zeros_like(y), x))
    _, similarity = strategy.pool.select(strategy.query(x), 3)
    expected = sum(similarity[n].sum() for n in range(8)) / 8
    torch.testing.assert_close(output.terms["key_similarity"], expected)
    torch.testing.assert_close(output.loss, output.terms["ce"] - 0.5 * expected)


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_the_query_and_the_prompted_pass_are_counted_once_each(pretrained, name):
    """Per training sample two forward passes (the query, the prompted pass through the head) and one
    backward; per evaluated sample two forward passes."""
    experiment = l2p_experiment if name == "l2p" else dualprompt_experiment
    strategy, scenario = strategy_for(experiment(pretrained))
    strategy.fit(scenario.train[0])
    n = 3 * len(scenario.train[0])  # 3 epochs
    assert (strategy.compute.forward_samples, strategy.compute.backward_samples) == (2 * n, n)
    with strategy.compute.evaluation():
        strategy.predict(scenario.test[0].inputs(torch.arange(8)).float(), None)
    assert strategy.compute.eval_forward_samples == 16


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_a_stream_with_a_one_class_experience_is_refused_before_training(pretrained, tmp_path, capsys, name):
    from cl.cli import main
    cfg = tiny_vit_file(tmp_path / "one_class.toml", pretrained, f'[[strategies]]\nname = "{name}"\n'
                        + ('g_layers = []\ne_layers = [0]\n' if name == "dualprompt" else ""), n_experiences=10)
    assert main(["run", str(cfg), "--store", f"sqlite:///{tmp_path / 'r.db'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{name}' restricts each experience's loss" in err[0], err


def test_the_backbone_stays_bit_identical_and_budgets_split_backbone_from_prompts(pretrained):
    strategy, scenario = strategy_for(l2p_experiment(pretrained))
    before = {k: v.clone() for k, v in strategy.model.features.state_dict().items()}
    for exp in scenario.train[:2]:
        strategy.fit(exp)
    for name, tensor in strategy.model.features.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert strategy.memory_bytes() == 4 * (6 * 3 * 16 + 6 * 16) + 8 * 6  # prompts, keys, selection counts
    assert strategy.model_bytes() == 4 * sum(p.numel() for p in strategy.model.parameters())


def test_l2p_forgets_far_less_than_fine_tuning(pretrained):
    cfg = l2p_experiment(pretrained, [{"name": "naive"}, {"name": "l2p", "pool_size": 6, "top_k": 2,
                                                           "prompt_length": 3}])
    naive, l2p = run(cfg, index=0), run(cfg, index=1)
    assert l2p.metrics.forgetting < naive.metrics.forgetting - 0.4
    assert l2p.metrics.acc > naive.metrics.acc


def test_l2p_continues_exactly_from_a_checkpoint(pretrained):
    original, restored = resumed_beside_original(l2p_experiment(pretrained, n_experiences=3))
    assert torch.equal(original.pool.prompts, restored.pool.prompts)
    assert torch.equal(original.pool.keys, restored.pool.keys)
    assert torch.equal(original.model.head.weight, restored.model.head.weight)
    assert original.compute == restored.compute


def test_diversified_selection_prefers_rarely_used_prompts():
    pool = PromptPool(pool_size=3, length=1, width=2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]))
    query = torch.tensor([[1.0, 0.25]])  # cos 0.970, 0.922, 0.243 with the three keys
    assert pool.select(query, top_k=1)[0].item() == 0  # the closest key
    # Prompt 0 took 90% of the earlier selections: (1 - cos) * share = 0.027, 0.0039, 0.038.
    index, similarity = pool.select(query, top_k=1, frequency=torch.tensor([0.9, 0.05, 0.05]))
    assert index.item() == 1
    torch.testing.assert_close(similarity[0, 0], torch.nn.functional.cosine_similarity(query, pool.keys[1:2])[0])


def test_prefixed_attention_equals_attending_to_extra_tokens():
    """Prefixing keys and values with an extra token's own keys and values is exactly what a block
    computes at the other positions when that token is part of the sequence."""
    from timm.models.vision_transformer import Block
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, mlp_ratio=2.0).eval()
    x, extra = torch.randn(3, 5, 16), torch.randn(3, 2, 16)
    width = 16
    k, v = block.attn.qkv(block.norm1(extra))[..., width:].split(width, dim=-1)
    with torch.no_grad():
        prefixed = prefixed_block(block, x, torch.stack([k, v], dim=1))
        joint = block(torch.cat([extra, x], dim=1))[:, 2:]
        torch.testing.assert_close(prefixed, joint, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefixed_block(block, x, torch.zeros(3, 2, 0, 16)), block(x))


def dualprompt_experiment(checkpoint, strategies=None, **options):
    return l2p_experiment(checkpoint, strategies or [{"name": "dualprompt", "g_layers": [], "e_layers": [0],
                                                      "g_length": 2, "e_length": 3}], **options)


def test_dualprompt_keeps_the_backbone_and_counts_its_prompts(pretrained):
    strategy, scenario = strategy_for(dualprompt_experiment(pretrained))
    before = {k: v.clone() for k, v in strategy.model.features.state_dict().items()}
    expert_before = strategy.pool.expert.detach().clone()
    strategy.fit(scenario.train[0])
    for name, tensor in strategy.model.features.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    changed = (strategy.pool.expert != expert_before).flatten(1).any(1)
    assert changed.tolist() == [True, False, False, False, False]  # only the experience's own E-prompt trains
    assert strategy.memory_bytes() == 4 * (5 * 1 * 2 * 3 * 16 + 5 * 16)  # E-prompts (no G-layers) and keys


def test_dualprompt_chooses_the_e_prompt_whose_key_matches_the_query(pretrained):
    strategy, scenario = strategy_for(dualprompt_experiment(pretrained))
    strategy.experience = scenario.train[2]  # as after training three experiences
    x = scenario.test[0].inputs(torch.arange(4)).float()
    query = strategy.query(x)
    with torch.no_grad():
        strategy.pool.keys.copy_(torch.randn(5, 16))
        strategy.pool.keys[1] = query.mean(0) * 10  # every query is closest to key 1 ...
        strategy.pool.keys[4] = query.mean(0) * 10  # ... but experience 4 has not been learned yet
    chosen = []
    strategy.features = lambda x, expert: chosen.append(expert) or torch.zeros(len(x), 16)
    strategy.predict(x, None)
    assert chosen[0].tolist() == [1, 1, 1, 1]


def test_dualprompt_forgets_far_less_than_fine_tuning(pretrained):
    cfg = dualprompt_experiment(pretrained, [{"name": "naive"}, {"name": "dualprompt", "g_layers": [],
                                                                  "e_layers": [0], "g_length": 2, "e_length": 3}])
    naive, dual = run(cfg, index=0), run(cfg, index=1)
    assert dual.metrics.forgetting < naive.metrics.forgetting - 0.3
    assert dual.metrics.acc > naive.metrics.acc


def test_dualprompt_continues_exactly_from_a_checkpoint(pretrained):
    original, restored = resumed_beside_original(dualprompt_experiment(pretrained, n_experiences=3))
    for name in ("general", "expert", "keys"):
        assert torch.equal(getattr(original.pool, name), getattr(restored.pool, name)), name
    assert torch.equal(original.model.head.weight, restored.model.head.weight)


def test_dualprompt_layers_beyond_the_backbone_are_refused_before_training(pretrained, tmp_path, capsys):
    from cl.cli import main
    from cl.store import ResultStore
    cfg = tiny_vit_file(tmp_path / "bad.toml", pretrained, '[[strategies]]\nname = "naive"\n'
                        '[[strategies]]\nname = "dualprompt"\ng_layers = []\ne_layers = [1]\n')
    store = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["run", str(cfg), "--store", store, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blocks 0..0 of the 1-block vit" in err[0]
    assert not (tmp_path / "r.db").exists() or ResultStore(store).list_runs() == []  # naive did not run either


@pytest.mark.slow
def test_on_the_protocol_l2p_beats_fine_tuning_over_three_seeds(tmp_path):
    """experiments/prompt_split_fashion_mnist.toml scaled down to minutes: the ViT pretrained on MNIST-5k
    for 10 epochs instead of 20, then 2000 training images per experience for 2 epochs and 400 test
    images per experience, seeds 0-2. L2P beats fine-tuning the whole backbone in class-IL ACC and
    forgets less, on every seed."""
    from cl.cli import main
    from cl.config import load_experiment
    checkpoint = tmp_path / "vit.pt"
    assert main(["pretrain", "experiments/pretrain/vit_mnist5k.toml", "--set", "training.epochs=10",
                 "--set", f'output="{checkpoint}"', "--no-progress", "--device", "cpu"]) == 0
    cfg = load_experiment("experiments/prompt_split_fashion_mnist.toml",
                          [f'model.checkpoint="{checkpoint}"', "scenario.train_per_experience=2000",
                           "scenario.test_per_experience=400", "training.epochs=2"], only_strategies=["l2p", "naive"])
    runs = {c.label: [run(cfg, seed=s, index=i).metrics for s in (0, 1, 2)] for i, c in enumerate(cfg.strategies)}
    for l2p, naive in zip(runs["l2p"], runs["naive"]):
        assert l2p.acc > naive.acc and l2p.forgetting < naive.forgetting


@pytest.mark.parametrize("interrupted", ["l2p", "dualprompt"])
def test_an_interrupted_prompt_run_resumes_bit_for_bit(pretrained, tmp_path, monkeypatch, interrupted):
    """The runner's checkpoints (cl/resume.py) hold everything l2p and dualprompt need."""
    from cl.cli import main
    from cl.resume import RunCheckpoint
    from cl.store import ResultStore
    path = tiny_vit_file(tmp_path / "prompts.toml", pretrained,
                         '[training]\nepochs = 2\nbatch_size = 32\noptimizer = "adam"\nlr = 0.01\n'
                         '[[strategies]]\nname = "l2p"\npool_size = 6\ntop_k = 2\nprompt_length = 3\n'
                         '[[strategies]]\nname = "dualprompt"\ng_layers = []\ne_layers = [0]\n', n_experiences=3)
    whole, parts = f"sqlite:///{tmp_path}/whole.db", f"sqlite:///{tmp_path}/parts.db"
    assert main(["run", str(path), "--store", whole, "--no-progress"]) == 0
    save = RunCheckpoint.save

    def interrupt(self, experiences_done, *args):
        save(self, experiences_done, *args)
        if experiences_done == 2 and self.identity["label"] == interrupted:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpoint, "save", interrupt)
    assert main(["run", str(path), "--store", parts, "--no-progress"]) == 130
    monkeypatch.setattr(RunCheckpoint, "save", save)
    assert main(["run", str(path), "--store", parts, "--no-progress", "--resume"]) == 0
    runs = {s: {r.strategy: (r.matrix, r.task_il_matrix) for r in ResultStore(s).records()} for s in (whole, parts)}
    assert runs[parts] == runs[whole] and len(runs[whole]) == 2
