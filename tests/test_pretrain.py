"""The vit backbone, `cl pretrain`, and loading pretrained checkpoints (ours and timm-format)."""
import hashlib

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from cl.errors import UserError
from cl.models import ViTParams, vit
from tests.helpers import digits_experiment, strategy_for

SMALL_VIT = {"name": "vit", "patch_size": 4, "width": 16, "depth": 1, "heads": 2}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_vit_builds_on_28_and_32_pixel_inputs(shape):
    model = vit(ViTParams(patch_size=4, width=32, depth=2, heads=4), shape, 10, 1)
    assert model(torch.rand(5, *shape)).shape == (5, 10)
    assert model.features(torch.rand(5, *shape)).shape == (5, 32)
    assert not list(model.buffers())


def test_vit_refuses_a_patch_size_that_does_not_divide_the_input():
    with pytest.raises(UserError, match="patch_size 5 does not divide the 28x28 inputs"):
        vit(ViTParams(patch_size=5), (1, 28, 28), 10, 1)
    with pytest.raises(ValueError, match="heads .3. must divide width .16."):
        ViTParams(width=16, heads=3).validate()


def pretraining_file(write_experiment, tmp_path, **changes):
    text = (f'name = "vit-digits"\nseed = 0\noutput = "{tmp_path / "vit.pt"}"\n[dataset]\nname = "digits"\n'
            f'[model]\nname = "vit"\npatch_size = 4\nwidth = 16\ndepth = 1\nheads = 2\n'
            f'[training]\nepochs = 2\nbatch_size = 32\noptimizer = "adam"\nlr = 0.003\n')
    for key, value in changes.items():
        text = text.replace(key, value)
    return write_experiment(text, name="pretrain.toml")


def test_cl_pretrain_writes_a_checkpoint_that_experiments_start_from(cli, write_experiment, tmp_path):
    result = cli("pretrain", pretraining_file(write_experiment, tmp_path), "--no-progress", "--device", "cpu")
    assert result.rc == 0, result.err
    assert "test accuracy" in result.out and str(tmp_path / "vit.pt") in result.out
    blob = torch.load(tmp_path / "vit.pt", weights_only=True)
    assert blob["format"] == "cl-pretrained-backbone/1" and blob["model"] == "vit"
    assert blob["params"]["width"] == 16 and blob["input_shape"] == [1, 8, 8]
    assert blob["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    from cl.runner import load_datasets
    cfg = digits_experiment([{"name": "naive"}], model="vit")
    (digits,) = load_datasets(cfg.datasets)
    expected = hashlib.sha256(digits.x_train.numpy().tobytes() + digits.y_train.numpy().tobytes()).hexdigest()
    assert blob["data_sha256"] == expected
    assert not (tmp_path / "vit.pt.partial").exists()
    # A continual experiment naming the checkpoint starts from exactly those weights.
    cfg = digits_experiment([{"name": "naive"}], model="vit")
    cfg.model.params.__dict__.update(patch_size=4, width=16, depth=1, heads=2, checkpoint=str(tmp_path / "vit.pt"))
    strategy, _ = strategy_for(cfg)
    for name, tensor in strategy.model.features.state_dict().items():
        assert torch.equal(tensor, blob["features"][name]), name


def test_a_timm_format_state_dict_loads_without_its_head(tmp_path):
    source = VisionTransformer(img_size=(8, 8), patch_size=4, in_chans=1, num_classes=7, embed_dim=16, depth=1,
                               num_heads=2, mlp_ratio=2.0)
    torch.save(source.state_dict(), tmp_path / "timm.pt")
    model = vit(ViTParams(patch_size=4, width=16, depth=1, heads=2, checkpoint=str(tmp_path / "timm.pt")), (1, 8, 8),
                10, 1)
    for name, tensor in model.features.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name


@pytest.mark.parametrize("problem, message", [
    ("missing", "no such file; write one with `cl pretrain FILE`"),
    ("truncated", "is not a readable checkpoint"),
    ("empty", "is not a readable checkpoint (EOFError: empty); it may be truncated"),  # was an IndexError
    ("mismatched", "does not fit the configured [model]: cls_token has shape [1, 1, 8], the model [1, 1, 16]"),
])
def test_bad_checkpoints_are_one_line_errors_before_anything_is_stored(problem, message, run_tiny, tiny_raw,
                                                                         stored, one_line_error, tmp_path):
    path = tmp_path / "vit.pt"
    if problem != "missing":
        source = VisionTransformer(img_size=(8, 8), patch_size=4, in_chans=1, num_classes=0, embed_dim=8, depth=1,
                                   num_heads=2, mlp_ratio=2.0)
        torch.save(source.state_dict(), path)
        if problem == "truncated":
            path.write_bytes(path.read_bytes()[:200])
        if problem == "empty":  # what a crash between the rename and the data reaching the disk leaves
            path.write_bytes(b"")
    raw = tiny_raw(model={**SMALL_VIT, "checkpoint": str(path)}, strategies=[{"name": "naive"}])
    result = run_tiny(raw)
    assert result.rc == 2
    assert message in one_line_error(result.err)
    assert stored() == []


@pytest.mark.parametrize("change, message", [
    ({"[training]": "[scenario]\nname = \"permuted\"\n[training]"}, "unknown key 'scenario' in a pretraining file"),
    ({"output = ": "elsewhere = "}, "unknown key 'elsewhere'"),
    ({"/vit.pt": ""}, "is a folder; name the file to write in it"),  # output = the test's folder
    ({"vit.pt": "vit/"}, "output must name the checkpoint file to write"),
    ({"vit.pt": "file.txt/vit.pt"}, "which is a file; choose another path"),
    ({"seed = 0": "seed = -1"}, "seed must be an integer in [0, 2**63), got -1"),
    ({"heads = 2\n": "heads = 2\nmulti_head = true\n"}, "model.multi_head: pretraining trains one head"),
    ({"[dataset]\nname = \"digits\"\n": "[[dataset]]\nname = \"digits\"\n[[dataset]]\nname = \"digits\"\n"},
     "a pretraining file takes one [dataset], got 2"),
])
def test_bad_pretraining_files_are_one_line_errors(change, message, cli, write_experiment, tmp_path, one_line_error):
    (tmp_path / "file.txt").write_text("not a folder")
    result = cli("pretrain", pretraining_file(write_experiment, tmp_path, **change), "--device", "cpu")
    assert result.rc == 2
    assert message in one_line_error(result.err)
    assert not (tmp_path / "vit.pt").exists() and not list(tmp_path.rglob("*.partial"))


def test_pretraining_takes_the_divergence_settings(cli, write_experiment, tmp_path, one_line_error):
    """[divergence] is read (the pretraining's loss monitor uses it) and checked like an experiment's."""
    for factor, rc in (("0.5", 2), ("20.0", 0)):
        text = f"[divergence]\nfactor = {factor}\ncheck_every = 5\n[training]"
        result = cli("pretrain", pretraining_file(write_experiment, tmp_path, **{"[training]": text}), "--no-progress",
                     "--device", "cpu")
        assert result.rc == rc, result.err
        assert (tmp_path / "vit.pt").exists() == (rc == 0)
    assert "[divergence]: factor must be > 1" in one_line_error(cli("pretrain", pretraining_file(
        write_experiment, tmp_path, **{"[training]": "[divergence]\nfactor = 0.5\n[training]"}), "--device", "cpu").err)
