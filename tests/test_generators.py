"""Scenario generators on small synthetic datasets, checked against hand-computable facts."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import cl.registry
from cl.data import LabelledData
from cl.errors import UserError
from cl.params import build_params
import cl.scenarios.generators as g

N_CLASSES, N_TRAIN, N_TEST = 10, 20, 5  # per class


def toy(n_classes: int = N_CLASSES, n_train: int = N_TRAIN, n_test: int = N_TEST,
        shape: tuple[int, ...] = (1, 4, 4), name: str = "toy", seed: int = 0) -> LabelledData:
    """Labels cycle 0..C-1 through the dataset; inputs are seeded random values in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    y_train = torch.arange(n_classes * n_train) % n_classes
    y_test = torch.arange(n_classes * n_test) % n_classes
    return LabelledData(name=name, x_train=torch.rand(len(y_train), *shape, generator=gen), y_train=y_train,
                        x_test=torch.rand(len(y_test), *shape, generator=gen), y_test=y_test,
                        n_classes=n_classes)


def classes_of(stream) -> list[list[int]]:
    return [e.classes.tolist() for e in stream]


def assert_mirrored(s) -> None:
    assert len(s.train) == len(s.test)
    for i, (tr, te) in enumerate(zip(s.train, s.test)):
        assert tr.id == te.id == i and tr.task_id == te.task_id == i
        assert tr.classes.tolist() == te.classes.tolist()
        assert tr.classes.dtype == torch.long


# ---------------------------------------------------------------- registry


def test_every_generator_is_registered():
    entries = cl.registry.SCENARIOS._entries
    expected = {"class_incremental": g.class_incremental, "permuted": g.permuted, "rotated": g.rotated,
                "domain_incremental": g.domain_incremental, "blurry": g.blurry}
    for name, fn in expected.items():
        assert entries[name].obj is fn
        assert entries[name].doc and "\n" not in entries[name].doc
        fields = dataclasses.fields(entries[name].params)
        assert all(f.metadata.get("doc") for f in fields)
        assert fields[-1].name == "seed" and fields[-1].default is None


# ---------------------------------------------------------------- class_incremental


def ci(d=None, seed: int = 0, **kw):
    return g.class_incremental([d or toy()], g.ClassIncrementalParams(**kw), seed)


def test_class_incremental_even_split_disjoint_covering():
    d = toy()
    s = ci(d, n_experiences=5)
    assert classes_of(s.train) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert s.setting == "class-il" and s.task_labels_at_test is False and s.n_classes == 10
    assert_mirrored(s)
    for tr, te in zip(s.train, s.test):
        assert len(tr) == 2 * N_TRAIN and len(te) == 2 * N_TEST
        assert set(tr.y.tolist()) == set(tr.classes.tolist()) == set(te.y.tolist())
        assert torch.equal(torch.bincount(tr.y, minlength=10)[tr.classes], torch.full((2,), N_TRAIN))
    # samples are the dataset's own rows, in dataset order
    idx = ((d.y_train == 2) | (d.y_train == 3)).nonzero().flatten()
    assert torch.equal(s.train[1].x, d.x_train[idx]) and torch.equal(s.train[1].y, d.y_train[idx])


def test_class_incremental_uneven_split_gives_extra_classes_first():
    s = ci(n_experiences=3)
    assert [len(c) for c in classes_of(s.train)] == [4, 3, 3]
    assert classes_of(s.train) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(e) for e in s.train] == [80, 60, 60]
    assert sum(len(e) for e in s.test) == N_CLASSES * N_TEST


def test_class_incremental_explicit_sizes_and_order():
    s = ci(n_experiences=3, classes_per_experience=[2, 3, 5], class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert classes_of(s.train) == [[8, 9], [5, 6, 7], [0, 1, 2, 3, 4]]
    assert s.description["class_order"] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert [e["n_train"] for e in s.description["experiences"]] == [40, 60, 100]


def test_class_incremental_shuffle_reproducible_from_seed():
    a, b = ci(seed=1, shuffle_classes=True), ci(seed=1, shuffle_classes=True)
    other = ci(seed=2, shuffle_classes=True)
    order = a.description["class_order"]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == b.description["class_order"] and order != other.description["class_order"]
    assert classes_of(a.train) == [sorted(order[i:i + 2]) for i in range(0, 10, 2)]
    # params seed overrides the run seed, and the resolved seed is recorded
    c = g.class_incremental([toy()], g.ClassIncrementalParams(shuffle_classes=True, seed=1), 99)
    assert c.description["class_order"] == order
    assert c.description["params"]["seed"] == 1 and a.description["params"]["seed"] == 1
    assert ci(seed=3).description["class_order"] == list(range(10))  # no shuffle: seed irrelevant


def test_class_incremental_keeps_random_subsets_of_each_experience():
    full, a, b = ci(), ci(train_per_experience=7, test_per_experience=3), ci(train_per_experience=7, test_per_experience=3)
    other = ci(seed=1, train_per_experience=7, test_per_experience=3)
    for exp_full, exp_a, exp_b, exp_o in zip(full.train, a.train, b.train, other.train):
        assert len(exp_a) == 7 and set(exp_a.y.tolist()) <= set(exp_full.classes.tolist())
        assert torch.equal(exp_a.x, exp_b.x)  # reproducible from the seed
        rows = {tuple(r.flatten().tolist()) for r in exp_full.x}
        assert all(tuple(r.flatten().tolist()) in rows for r in exp_a.x)  # its own samples, not copies
        assert not torch.equal(exp_a.x, exp_o.x)
    assert [len(e) for e in a.test] == [3] * 5
    assert [len(e) for e in full.train] == [2 * N_TRAIN] * 5  # 0 keeps all
    with pytest.raises(UserError, match="train_per_experience=41 is more than the 40 samples"):
        ci(train_per_experience=41)


def test_class_incremental_task_labels_flip_setting():
    s = ci(task_labels=True)
    assert s.setting == "task-il" and s.task_labels_at_test is True
    assert [e.task_id for e in s.test] == [0, 1, 2, 3, 4] and s.n_tasks == 5
    assert_mirrored(s)


def test_description_is_json_and_complete():
    d = toy()
    s = ci(d, n_experiences=2)
    desc = json.loads(json.dumps(s.description))
    assert desc["name"] == "class_incremental"
    assert desc["params"] == {**dataclasses.asdict(g.ClassIncrementalParams(n_experiences=2)), "seed": 0}
    assert desc["datasets"] == [d.describe()]
    assert desc["experiences"] == [{"classes": [0, 1, 2, 3, 4], "n_train": 100, "n_test": 25},
                                   {"classes": [5, 6, 7, 8, 9], "n_train": 100, "n_test": 25}]


@pytest.mark.parametrize("kw, needle", [
    ({"n_experiences": 11}, "n_experiences"),
    ({"n_experiences": 0}, "n_experiences"),
    ({"n_experiences": 3, "classes_per_experience": [2, 3, 4]}, "classes_per_experience"),
    ({"n_experiences": 2, "classes_per_experience": [2, 3, 5]}, "classes_per_experience"),
    ({"n_experiences": 3, "classes_per_experience": [0, 5, 5]}, "classes_per_experience"),
    ({"class_order": [0, 1, 2]}, "class_order"),
    ({"class_order": [0, 0, 2, 3, 4, 5, 6, 7, 8, 9]}, "class_order"),
    ({"class_order": list(range(10)), "shuffle_classes": True}, "shuffle_classes"),
])
def test_class_incremental_invalid_params(kw, needle):
    with pytest.raises(UserError, match=needle) as info:
        ci(**kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fn, params", [
    (g.class_incremental, g.ClassIncrementalParams()), (g.permuted, g.PermutedParams()),
    (g.rotated, g.RotatedParams()), (g.blurry, g.BlurryParams()),
])
def test_labels_outside_class_range_rejected(fn, params):
    d = toy()
    d.y_train[0] = 10
    with pytest.raises(UserError, match="has training labels outside 0..9 \\(found 0..10\\)"):
        fn([d], params, 0)
    d = toy()
    d.y_test[3] = -1
    with pytest.raises(UserError, match="has test labels outside"):
        fn([d], params, 0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_dataset_without_samples_is_rejected(split):
    d = toy()
    setattr(d, f"x_{split}", getattr(d, f"x_{split}")[:0])
    setattr(d, f"y_{split}", getattr(d, f"y_{split}")[:0])
    with pytest.raises(UserError, match=f"has no {split}(ing)? samples"):
        ci(d)
    d2 = toy()
    with pytest.raises(UserError, match="has no"):
        g.domain_incremental([d2, d], g.DomainIncrementalParams(), 0)


def test_invalid_params_rejected_by_build_params_too():
    with pytest.raises(UserError, match="scenario 'permuted': fraction must be in"):
        build_params(g.PermutedParams, {"fraction": 1.5}, "scenario 'permuted'")
    with pytest.raises(UserError, match="min_angle"):
        build_params(g.RotatedParams, {"min_angle": 90, "max_angle": 10}, "scenario 'rotated'")
    with pytest.raises(UserError, match="overlap"):
        build_params(g.BlurryParams, {"overlap": -0.1}, "scenario 'blurry'")
    with pytest.raises(UserError, match="overlap 1 leaves a class no more samples at home"):
        build_params(g.BlurryParams, {"overlap": 1.0, "n_experiences": 2}, "scenario 'blurry'")
    with pytest.raises(UserError, match="use overlap < 0.8"):
        build_params(g.BlurryParams, {"overlap": 0.8, "n_experiences": 5}, "scenario 'blurry'")
    assert build_params(g.BlurryParams, {"overlap": 0.79, "n_experiences": 5}, "scenario 'blurry'").overlap == 0.79
    assert build_params(g.PermutedParams, {"fraction": 0}, "x").fraction == 0.0


@pytest.mark.parametrize("fn, params", [
    (g.class_incremental, g.ClassIncrementalParams()), (g.permuted, g.PermutedParams()),
    (g.rotated, g.RotatedParams()), (g.blurry, g.BlurryParams()),
])
def test_single_dataset_generators_reject_two(fn, params):
    with pytest.raises(UserError, match=r"takes one dataset, got 2"):
        fn([toy(), toy()], params, 0)


# ---------------------------------------------------------------- permuted


def test_permuted_same_permutation_for_train_and_test_and_across_calls():
    d = toy(shape=(2, 3, 4))
    s = g.permuted([d], g.PermutedParams(n_experiences=3), 5)
    again = g.permuted([d], g.PermutedParams(n_experiences=3), 5)
    other = g.permuted([d], g.PermutedParams(n_experiences=3), 6)
    assert s.setting == "domain-il" and s.task_labels_at_test is False and s.n_classes == 10
    assert_mirrored(s)
    assert s.input_shape == (2, 3, 4)
    flat_tr, flat_te = d.x_train.flatten(1), d.x_test.flatten(1)
    perms = []
    for tr, te in zip(s.train, s.test):
        # recover the permutation from train: output position j holds input position perm[j]
        # (inputs are random floats, so each column of the dataset is unique)
        out = tr.inputs().flatten(1)
        perm = torch.tensor([int((flat_tr == out[:, j:j + 1]).all(0).nonzero()) for j in range(24)])
        assert sorted(perm.tolist()) == list(range(24)) and perm.tolist() != list(range(24))
        assert torch.equal(te.inputs().flatten(1), flat_te[:, perm])  # same permutation on test
        assert tr.x is d.x_train and te.x is d.x_test  # all samples: the dataset itself, not a copy
        assert torch.equal(tr.y, d.y_train) and torch.equal(te.y, d.y_test)
        perms.append(perm)
    assert not torch.equal(perms[0], perms[1])  # one permutation per experience
    for a, b in zip(s.train + s.test, again.train + again.test):
        assert torch.equal(a.inputs(), b.inputs())
    assert not torch.equal(s.train[0].inputs(), other.train[0].inputs())
    batch = torch.tensor([3, 0, 7])
    assert torch.equal(s.train[1].inputs(batch), s.train[1].inputs()[batch])  # a batch reads the same


def test_permuted_fraction_zero_is_identity():
    d = toy()
    s = g.permuted([d], g.PermutedParams(n_experiences=2, fraction=0.0), 0)
    for tr, te in zip(s.train, s.test):
        assert torch.equal(tr.inputs(), d.x_train) and torch.equal(te.inputs(), d.x_test)
    assert s.description["n_permuted_positions"] == 0


def test_permuted_half_fraction_moves_about_half():
    size = 100
    gen = torch.Generator().manual_seed(0)
    perm, positions = g._partial_permutation(size, 0.5, gen)
    assert len(positions) == 50 == len(set(positions.tolist()))
    moved = (perm != torch.arange(size)).nonzero().flatten()
    assert set(moved.tolist()) <= set(positions.tolist())  # only drawn positions move
    assert 40 <= len(moved) <= 50  # a few drawn positions may map to themselves
    assert sorted(perm[positions].tolist()) == sorted(positions.tolist())  # permuted among themselves
    assert len(g._partial_permutation(7, 0.5, gen)[1]) == round(3.5)  # Python round: 4
    d = toy(shape=(1, 10, 10))
    s = g.permuted([d], g.PermutedParams(n_experiences=1, fraction=0.5), 0)
    changed = (s.train[0].inputs().flatten(1) != d.x_train.flatten(1)).any(0).sum()
    assert 40 <= int(changed) <= 50 and s.description["n_permuted_positions"] == 50


def test_permuted_subsets_per_experience():
    d = toy()
    p = g.PermutedParams(n_experiences=3, fraction=0.0, train_per_experience=30, test_per_experience=7)
    s = g.permuted([d], p, 0)
    assert [len(e) for e in s.train] == [30, 30, 30] and [len(e) for e in s.test] == [7, 7, 7]
    assert [e["n_train"] for e in s.description["experiences"]] == [30, 30, 30]
    rows = []
    for tr, te in zip(s.train, s.test):
        # fraction 0 leaves inputs intact, so each sample can be traced back to its dataset row
        idx = [int((d.x_train == x).flatten(1).all(1).nonzero()) for x in tr.x]
        assert idx == sorted(set(idx))  # distinct rows, kept in dataset order
        assert torch.equal(tr.y, d.y_train[idx])
        te_idx = [int((d.x_test == x).flatten(1).all(1).nonzero()) for x in te.x]
        assert te_idx == sorted(set(te_idx)) and torch.equal(te.y, d.y_test[te_idx])
        rows.append(idx)
    assert rows[0] != rows[1] != rows[2]  # each experience draws its own subset
    assert [e.y.tolist() for e in g.permuted([d], p, 0).train] == [e.y.tolist() for e in s.train]
    with pytest.raises(UserError, match="train_per_experience=500"):
        g.permuted([d], g.PermutedParams(train_per_experience=500), 0)


# ---------------------------------------------------------------- rotated


def test_rotated_angles_lie_in_their_slices():
    s = g.rotated([toy()], g.RotatedParams(n_experiences=4, min_angle=10.0, max_angle=90.0), 3)
    angles = s.description["angles"]
    assert len(angles) == 4
    for t, a in enumerate(angles):
        assert 10.0 + 20.0 * t <= a < 10.0 + 20.0 * (t + 1)
    assert angles == g.rotated([toy()], g.RotatedParams(n_experiences=4, min_angle=10.0, max_angle=90.0),
                               3).description["angles"]
    assert s.setting == "domain-il" and s.task_labels_at_test is False
    assert_mirrored(s)


def test_rotated_90_degrees_matches_rot90_on_train_and_test():
    d = toy(shape=(1, 8, 8))
    s = g.rotated([d], g.RotatedParams(n_experiences=2, min_angle=90.0, max_angle=90.0), 0)
    assert s.description["angles"] == [90.0, 90.0]
    for tr, te in zip(s.train, s.test):
        assert torch.allclose(tr.inputs(), torch.rot90(d.x_train, 1, dims=(-2, -1)), atol=1e-5)
        assert torch.allclose(te.inputs(), torch.rot90(d.x_test, 1, dims=(-2, -1)), atol=1e-5)
        assert torch.equal(tr.y, d.y_train)


def test_rotated_small_angle_changes_images_and_subsets():
    d = toy(shape=(3, 8, 8))
    s = g.rotated([d], g.RotatedParams(n_experiences=2, min_angle=30.0, max_angle=40.0,
                                       train_per_experience=15, test_per_experience=4), 0)
    assert [len(e) for e in s.train] == [15, 15] and [len(e) for e in s.test] == [4, 4]
    assert s.train[0].inputs().shape == (15, 3, 8, 8)
    assert float(s.train[0].inputs().min()) >= 0.0 and float(s.train[0].inputs().max()) <= 1.0
    assert not torch.equal(s.train[0].inputs(), s.train[0].x)
    with pytest.raises(UserError, match="image inputs"):
        g.rotated([toy(shape=(16,))], g.RotatedParams(), 0)
    with pytest.raises(UserError, match="image inputs"):  # MNIST-1D's (channel, length): rotating it zeroed most of it
        g.rotated([toy(shape=(1, 40))], g.RotatedParams(), 0)


@pytest.mark.parametrize("scenario", ["class_incremental", "permuted", "rotated"])
def test_the_test_subsets_size_never_changes_the_training_subsets(scenario):
    """Evaluating on more or fewer test samples must train on the same stream (cl/seeding.py's rule:
    each random purpose has its own generator)."""
    build, params = {"class_incremental": (g.class_incremental, g.ClassIncrementalParams),
                     "permuted": (g.permuted, g.PermutedParams), "rotated": (g.rotated, g.RotatedParams)}[scenario]
    streams = [build([toy()], params(n_experiences=3, train_per_experience=6, test_per_experience=k), 0)
               for k in (0, 2, 4)]
    for stream in streams[1:]:
        for exp, reference in zip(stream.train, streams[0].train):
            assert torch.equal(exp.x, reference.x) and torch.equal(exp.y, reference.y)
    assert [len(e) for e in streams[2].test] == [4, 4, 4]


def test_rotated_accepts_images_without_channel_dim():
    d = toy(shape=(6, 6))
    s = g.rotated([d], g.RotatedParams(n_experiences=1, min_angle=90.0, max_angle=90.0), 0)
    assert torch.allclose(s.train[0].inputs(), torch.rot90(d.x_train, 1, dims=(-2, -1)), atol=1e-5)


def test_rotated_uint8_images_stay_uint8_and_round_like_float_rotation():
    d = toy(shape=(1, 8, 8))
    d8 = dataclasses.replace(d, x_train=(d.x_train * 255).round().to(torch.uint8),
                             x_test=(d.x_test * 255).round().to(torch.uint8))
    s = g.rotated([d8], g.RotatedParams(n_experiences=1, min_angle=33.0, max_angle=33.0), 0)
    rotated = s.train[0].inputs()
    assert rotated.dtype == torch.uint8
    as_float = g.rotated([dataclasses.replace(d8, x_train=d8.x_train.float())],
                         g.RotatedParams(n_experiences=1, min_angle=33.0, max_angle=33.0), 0).train[0].inputs()
    assert torch.equal(rotated.float(), as_float.round())


def test_permuted_full_size_stream_costs_one_copy_of_the_data():
    """20 permutations of a 60k/10k 28x28 uint8 dataset (MNIST's size) must fit in under 300 MB:
    materialising them as float32 would take about 4.4 GB."""
    gen = torch.Generator().manual_seed(0)
    big = LabelledData("big", torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8, generator=gen),
                       torch.randint(0, 10, (60_000,), generator=gen),
                       torch.randint(0, 256, (10_000, 1, 28, 28), dtype=torch.uint8, generator=gen),
                       torch.randint(0, 10, (10_000,), generator=gen), 10)
    s = g.permuted([big], g.PermutedParams(n_experiences=20), 0)
    assert s.nbytes() == 70_000 * 784 + 70_000 * 8  # images and labels, once
    assert s.nbytes() < 300e6
# ---------------------------------------------------------------- domain_incremental


def test_domain_incremental_resizes_to_first_dataset():
    a, b = toy(shape=(1, 4, 4), name="a"), toy(shape=(1, 8, 8), name="b", seed=1)
    s = g.domain_incremental([a, b], g.DomainIncrementalParams(), 0)
    assert s.setting == "domain-il" and s.n_classes == 10 and len(s) == 2
    assert_mirrored(s)
    assert torch.equal(s.train[0].x, a.x_train) and torch.equal(s.train[1].y, b.y_train)
    assert s.train[1].x.shape == (len(b.y_train), 1, 4, 4) and s.test[1].x.shape == (len(b.y_test), 1, 4, 4)
    # 8x8 -> 4x4 bilinear (no antialias, align_corners=False) averages each 2x2 block
    block_mean = torch.nn.functional.avg_pool2d(b.x_test, 2)
    assert torch.allclose(s.test[1].x, block_mean, atol=1e-6)
    assert [x["name"] for x in s.description["datasets"]] == ["a", "b"]


def test_domain_incremental_errors():
    p = g.DomainIncrementalParams()
    with pytest.raises(UserError, match="shared label space"):
        g.domain_incremental([toy(), toy(n_classes=5)], p, 0)
    with pytest.raises(UserError, match="two or more datasets, got 1"):
        g.domain_incremental([toy()], p, 0)
    with pytest.raises(UserError, match="channel"):
        g.domain_incremental([toy(shape=(1, 4, 4)), toy(shape=(3, 4, 4))], p, 0)
    with pytest.raises(UserError, match="resize = true"):
        g.domain_incremental([toy(shape=(1, 4, 4)), toy(shape=(1, 8, 8))],
                             g.DomainIncrementalParams(resize=False), 0)


# ---------------------------------------------------------------- blurry


def test_blurry_without_overlap_equals_class_incremental():
    d = toy()
    for kw in ({}, {"shuffle_classes": True}, {"class_order": [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]}):
        b = g.blurry([d], g.BlurryParams(n_experiences=4, overlap=0.0, **kw), 7)
        c = g.class_incremental([d], g.ClassIncrementalParams(n_experiences=4, **kw), 7)
        assert classes_of(b.train) == classes_of(c.train) == classes_of(b.test)
        for x, y in zip(b.train + b.test, c.train + c.test):
            assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y)


def test_blurry_overlap_keeps_80_percent_at_home():
    d = toy()
    s = g.blurry([d], g.BlurryParams(n_experiences=5, overlap=0.2), 0)
    homes = s.description["home_classes"]
    assert homes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]] and s.setting == "class-il"
    counts = torch.stack([torch.bincount(e.y, minlength=10) for e in s.train])  # [experience, class]
    assert counts.sum() == len(d.y_train)  # nothing lost or duplicated
    assert torch.equal(counts.sum(0), torch.full((10,), N_TRAIN))
    for i, home in enumerate(homes):
        for c in home:
            assert counts[i, c] == N_TRAIN - round(0.2 * N_TRAIN) == 16
        assert classes_of([s.test[i]]) == [home]
        assert sorted(set(s.test[i].y.tolist())) == home and len(s.test[i]) == 2 * N_TEST
    assert all(set(homes[i]) <= set(e.classes.tolist()) for i, e in enumerate(s.train))
    assert all(e.classes.tolist() == sorted(set(e.y.tolist())) for e in s.train)
    assert any(len(e.classes) > 2 for e in s.train)  # boundaries are actually blurred
    again = g.blurry([d], g.BlurryParams(n_experiences=5, overlap=0.2), 0)
    assert all(torch.equal(a.y, b.y) for a, b in zip(s.train, again.train))


def test_blurry_rounding_rule_half_to_even():
    d = toy(n_classes=4, n_train=10)
    s = g.blurry([d], g.BlurryParams(n_experiences=2, overlap=0.25), 0)  # 2.5 -> 2 moved
    counts = torch.stack([torch.bincount(e.y, minlength=4) for e in s.train])
    assert counts[0, :2].tolist() == [8, 8] and counts[1, 2:].tolist() == [8, 8]
    assert counts[1, :2].tolist() == [2, 2] and counts[0, 2:].tolist() == [2, 2]  # only one other experience
    s = g.blurry([toy(n_classes=4, n_train=30)], g.BlurryParams(n_experiences=2, overlap=0.25), 0)
    assert torch.bincount(s.train[0].y, minlength=4)[:2].tolist() == [22, 22]  # 7.5 -> 8 moved


def test_blurry_invalid_params():
    with pytest.raises(UserError, match="overlap"):
        g.blurry([toy()], g.BlurryParams(overlap=1.5), 0)
    with pytest.raises(UserError, match="n_experiences"):
        g.blurry([toy()], g.BlurryParams(n_experiences=1, overlap=0.1), 0)
    with pytest.raises(UserError, match="n_experiences=11"):
        g.blurry([toy()], g.BlurryParams(n_experiences=11), 0)
