"""L2P: key selection, the surrogate key loss, the frozen backbone, learning and forgetting, checkpoints."""
import pytest
import torch

from cl.strategies.prompt import PromptPool
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


def test_the_backbone_stays_bit_identical_and_budgets_split_backbone_from_prompts(pretrained):
    strategy, scenario = strategy_for(l2p_experiment(pretrained))
    before = {k: v.clone() for k, v in strategy.model.features.state_dict().items()}
    for exp in scenario.train[:2]:
        strategy.fit(exp)
    for name, tensor in strategy.model.features.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert strategy.memory_bytes() == 4 * (6 * 3 * 16 + 6 * 16)  # prompts and keys
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
