"""The input pipeline: decoding, augmentation, normalisation and resizing, on hand-checkable batches."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl.runner import build_scenario, input_pipeline, load_datasets
from cl.transforms import InputPipeline, Permutation, Rotation, TransformParams, channel_statistics, random_crop, \
    to_float
from tests.helpers import DEVICES, digits_experiment


def pipeline(shape=(2, 4, 4), device="cpu", mean=None, std=None, **params):
    return InputPipeline(TransformParams(**params), shape, torch.device(device), mean, std)


def test_to_float_divides_uint8_by_255_and_passes_floats():
    x = torch.arange(256, dtype=torch.uint8)
    out = to_float(x)
    assert out.dtype == torch.float32 and out[0] == 0.0 and out[255] == 1.0
    # division (correctly rounded, as numpy's float32 x / 255), not multiplication by 1/255
    assert torch.equal(out, torch.from_numpy(x.numpy().astype(np.float32) / np.float32(255)))
    f = torch.rand(3)
    assert to_float(f) is f


@pytest.mark.parametrize("device", DEVICES)
def test_random_crop_equals_cropping_the_padded_image_at_the_drawn_offsets(device):
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.arange(5 * 2 * 4 * 6, dtype=torch.float32, device=device).view(5, 2, 4, 6)
    state = gen.get_state()
    out = random_crop(x, 2, gen)
    gen.set_state(state)
    dy, dx = torch.randint(0, 5, (2, 5), generator=gen, device=device).tolist()
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 4, dx[i]:dx[i] + 6])
    assert len({(a, b) for a, b in zip(dy, dx)}) > 1  # offsets differ between samples


def test_flip_and_crop_only_in_training_and_drawn_from_the_given_generator():
    p = pipeline(crop_padding=1, horizontal_flip=True)
    x = torch.randint(0, 256, (64, 2, 4, 4), dtype=torch.uint8)
    assert torch.equal(p(x, train=False), to_float(x))
    a = p(x, train=True, generator=torch.Generator().manual_seed(0))
    b = p(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, to_float(x))


def test_flip_mirrors_about_half_of_the_samples():
    p = pipeline(horizontal_flip=True)
    x = torch.rand(400, 2, 4, 4)
    out = p(x, train=True, generator=torch.Generator().manual_seed(1))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())
    assert 160 < int(flipped.sum()) < 240


def test_normalize_uses_per_channel_statistics():
    p = pipeline(normalize=True, mean=[0.5, 0.25], std=[0.5, 0.25])
    x = torch.full((1, 2, 4, 4), 255, dtype=torch.uint8)
    out = p(x, train=False)
    assert out[0, 0].unique().tolist() == [1.0] and out[0, 1].unique().tolist() == [3.0]
    with pytest.raises(ValueError, match="one mean and std per channel"):
        pipeline(normalize=True, mean=[0.5], std=[0.5])


def test_resize_and_output_shape():
    p = pipeline(shape=(1, 8, 8), resize=[16, 12])
    assert p.output_shape == (1, 16, 12)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(p(x, train=False), F.interpolate(x, size=(16, 12), mode="bilinear", align_corners=False))


def test_image_transforms_need_images():
    with pytest.raises(ValueError, match="crop_padding need image inputs"):
        pipeline(shape=(40,), crop_padding=2)


def test_crop_padding_must_be_smaller_than_the_image():
    """A huge padding used to fail at the first step, asking for terabytes."""
    pipeline(shape=(1, 4, 4), crop_padding=3)
    with pytest.raises(ValueError, match=r"crop_padding \(4\) must be smaller than the images' height and width "
                                         r"\[4, 4\]"):
        pipeline(shape=(1, 4, 4), crop_padding=4)
    with pytest.raises(ValueError, match=r"\[2, 2\]"):  # after resizing
        pipeline(shape=(1, 8, 8), resize=[2, 2], crop_padding=2)


def test_a_constant_channel_cannot_be_normalised_with_computed_statistics():
    cfg = digits_experiment([{"name": "naive"}], normalize=True)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    for exp in scenario.train:
        exp.x = torch.zeros_like(exp.x)
    from cl.errors import UserError
    with pytest.raises(UserError, match="channel 0 of the training data is constant"):
        input_pipeline(cfg, scenario, torch.device("cpu"))


def test_channel_statistics():
    x = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_statistics([x[:20], x[20:]], chunk=7)
    f = x.double() / 255
    assert mean == pytest.approx(f.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(f.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)


def test_runner_computes_normalisation_from_training_data():
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2, normalize=True)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    p = input_pipeline(cfg, scenario, torch.device("cpu"))
    train_x = torch.cat([e.x for e in scenario.train])
    assert p.mean.flatten().tolist() == pytest.approx([train_x.double().mean().item()], abs=1e-6)
    out = torch.cat([p(e.x, train=False) for e in scenario.train])
    assert out.mean().item() == pytest.approx(0.0, abs=1e-5) and out.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_sample_transforms_keep_the_dtype():
    x = torch.randint(0, 256, (2, 1, 3, 3), dtype=torch.uint8)
    perm = Permutation(torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0]))
    assert perm(x).dtype == torch.uint8 and torch.equal(perm(x), x.flip(-1).flip(-2))
    assert Rotation(180.0)(x).dtype == torch.uint8
