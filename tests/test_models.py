import pytest
import torch

from cl.errors import UserError
from cl.models import CNNParams, MLPParams, ResNetParams, cnn, mlp, module_bytes, resnet18_reduced
from cl.params import build_params


def test_mlp_shapes_and_size():
    m = mlp(MLPParams(hidden=[100, 100]), (1, 28, 28), 10, 1)
    assert m(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    # 784*100+100 + 100*100+100 + 100*10+10 parameters, 4 bytes each (the GEM MLP)
    assert module_bytes(m) == 4 * (784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10)


def test_cnn_and_resnet_shapes():
    assert cnn(CNNParams(), (1, 28, 28), 10, 1)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    r = resnet18_reduced(ResNetParams(), (3, 32, 32), 100, 1)
    assert r(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert r.feature_dim == 160  # 20 * 8 channels in the last stage (GEM's reduced ResNet-18)
    # The reduced ResNet-18 of GEM/A-GEM has about 1.1M parameters with 100 outputs.
    n_params = sum(p.numel() for p in r.parameters())
    assert 1.0e6 < n_params < 1.2e6


def test_image_models_reject_flat_inputs():
    with pytest.raises(UserError, match="image inputs"):
        cnn(CNNParams(), (1, 40), 10, 1)


def test_cnn_refuses_more_pooling_blocks_than_the_image_has_pixels_for():
    assert cnn(CNNParams(channels=[4, 4, 4]), (1, 8, 8), 10, 1)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)  # 8-4-2-1
    with pytest.raises(UserError, match=r"4 blocks halve a 8-pixel side 4 times, to nothing; give at most 3"):
        cnn(CNNParams(channels=[4, 4, 4, 4]), (1, 8, 8), 10, 1)


def test_multi_head_picks_the_head_of_each_sample():
    m = mlp(MLPParams(hidden=[4], multi_head=True), (3,), 2, 3)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor([0.0, 1, 10, 11, 20, 21]))  # head k outputs (10k, 10k+1)
    out = m(torch.zeros(3, 3), torch.tensor([2, 0, 1]))
    assert out.tolist() == [[20, 21], [0, 1], [10, 11]]
    with pytest.raises(RuntimeError, match="task ids"):
        m(torch.zeros(1, 3))


def test_model_params_validated():
    with pytest.raises(UserError, match="hidden"):
        build_params(MLPParams, {"hidden": 3}, "model 'mlp'")


def test_all_heads_in_one_pass():
    torch.manual_seed(0)
    multi = mlp(MLPParams(hidden=[8], multi_head=True), (1, 4, 4), 6, 3)
    x = torch.rand(5, 1, 4, 4)
    heads = multi(x, all_heads=True)
    assert heads.shape == (5, 3, 6)
    for h in range(3):
        assert torch.allclose(heads[:, h], multi(x, torch.full((5,), h)))
    single = mlp(MLPParams(hidden=[8]), (1, 4, 4), 6, 3)
    assert torch.equal(single(x, all_heads=True), single(x).unsqueeze(1))
    assert multi.multi_head and not single.multi_head and multi.feature_dim == 8
