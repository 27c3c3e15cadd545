"""Image datasets, holder partitions and augmentation for the federated simulation.

Every dataset loads to uint8 arrays, channels first, with per-channel statistics computed on its
training split. Dataset specs (see `load_dataset`): `digits` (built in, no download), `cifar10`,
`cifar100`, `medmnist:NAME`, `npz:PATH` (MedMNIST `.npz` layout) and `folder:PATH` (one sub-folder
of images per class).

Partitions are a small numpy implementation rather than flwr-datasets: its partitioners do work
offline on an in-memory `datasets.Dataset`, but they pull in about 290 MB of dependencies (Hugging
Face datasets, pyarrow, pandas) and 4 s of import time, and its `DirichletPartitioner` gives up
("max number of attempts") for 1,000 holders on the 1,797 digits whatever the minimum size.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import pickle
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from simulation.errors import UsageError

DATASET_CHOICES = (
    "digits (built in, 8x8 grey), cifar10, cifar100, medmnist:NAME (e.g. medmnist:pneumoniamnist), "
    "npz:PATH (MedMNIST .npz layout), folder:PATH (one sub-folder of images per class)"
)

TEST_FRACTION = 0.2
"""Share of each class held out as the test split where a dataset has none of its own."""

_SPLIT_SEED = 0
_FOLDER_IMAGE_SIZE = 32
_RESIZE_CHUNK = 2048
_BAR_CHART_MAX_HOLDERS = 50
_DOWNLOAD_TIMEOUT_S = 60
_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_NPZ_LAYOUT = "a MedMNIST-layout .npz with uint8 train_images, test_images and integer train_labels, test_labels"

# MedMNIST v3 release on Zenodo; the MD5 sums are the ones the medmnist package checks.
_MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"
_ORGANS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
)  # fmt: skip
_MEDMNIST: dict[str, tuple[str, tuple[str, ...]]] = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
    )),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", ("no finding", "any finding")),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions",
    )),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", (
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal",
    )),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", ("normal", "pneumonia")),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", tuple(f"grade {g}" for g in range(5))),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", ("malignant", "normal, benign")),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", (
        "basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
        "monocyte", "neutrophil", "platelet",
    )),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", (
        "collecting duct, connecting tubule", "distal convoluted tubule",
        "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes",
        "podocytes", "proximal tubule segments", "thick ascending limb",
    )),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", _ORGANS),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", _ORGANS),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", _ORGANS),
}  # fmt: skip

_log = logging.getLogger(__name__)


class DataError(UsageError):
    """Missing, empty or malformed data, or an unknown dataset.

    The message names the path (where there is one) and what was expected there.
    """


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """Images and their class labels."""

    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A classification dataset with train, test and optional validation splits."""

    name: str
    train: ImageSplit
    test: ImageSplit
    val: ImageSplit | None
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, images scaled to [0, 1], computed on train
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.train.images.shape[1:]
        return channels, height, width


def default_data_dir() -> Path:
    """Where downloaded datasets go unless a data directory is given: the user's cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mple" / "data"


def load_dataset(
    spec: str, *, data_dir: str | Path | None = None, image_size: int | None = None, download: bool = True
) -> ImageDataset:
    """Load a dataset by spec (see `DATASET_CHOICES`).

    - `digits`: scikit-learn's handwritten digits, 8x8 grey (0..16 scaled to 0..255), stratified
      80/20 train/test split with a fixed seed.
    - `cifar10`, `cifar100`: the standard `cifar-10-batches-py` / `cifar-100-python` folder in
      `data_dir`, downloaded there through torchvision when missing and `download` is true.
    - `medmnist:NAME`: `NAME.npz` in `data_dir`, downloaded from MedMNIST's Zenodo record when
      missing and `download` is true. ChestMNIST's 14 multi-label findings become one binary
      label: 0 "no finding", 1 "any finding".
    - `npz:PATH`: a file in the MedMNIST layout (keys train_images, train_labels, test_images,
      test_labels, optional val_images, val_labels; uint8 images (N, H, W) or (N, H, W, 3);
      integer labels (N,) or (N, 1)). Class names are the label numbers.
    - `folder:PATH`: one sub-folder per class (class names are the sorted folder names), images of
      any size, mode and common format. The dataset is grey if every image is grey (a grey mode,
      or equal colour channels), else RGB; alpha is dropped; 16-bit images are scaled to 8 bits.
      Images are squashed to `image_size` squares (32 unless given). The test split is the
      `test/` tree if PATH holds exactly `train/` and `test/`, else a stratified 20% share.

    `image_size` resizes every image to image_size x image_size (bilinear, antialiased). Bad or
    missing data raises `DataError`.
    """
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise UsageError(f"image size must be a positive integer, got {image_size!r}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    kind, _, argument = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "digits" and not argument:
        name, (train, test, val), class_names = "digits", _load_digits(), tuple(str(d) for d in range(10))
    elif kind in ("cifar10", "cifar100") and not argument:
        name, (train, test, val, class_names) = kind, _load_cifar(kind, data_dir, download)
    elif kind == "medmnist" and argument:
        name = argument.strip().lower()
        train, test, val, class_names = _load_medmnist(name, data_dir, download)
    elif kind == "npz" and argument:
        path = Path(argument).expanduser()
        name = path.stem
        train, test, val = _read_npz(path)
        num_classes = 1 + max(int(split.labels.max()) for split in (train, test, val) if split is not None)
        class_names = tuple(str(label) for label in range(num_classes))
    elif kind == "folder" and argument:
        path = Path(argument).expanduser()
        name = path.name
        train, test, class_names = _load_folder(path, image_size or _FOLDER_IMAGE_SIZE)
        val = None
    else:
        raise DataError(f"unknown dataset {spec!r}; expected one of: {DATASET_CHOICES}")
    if image_size is not None:
        train, test, val = (_resize_split(split, image_size) for split in (train, test, val))
    mean, std = _channel_stats(train.images)
    return ImageDataset(name, train, test, val, len(class_names), class_names, mean, std)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Scale uint8 images ((B, C, H, W) or (C, H, W)) to [0, 1] and standardise each channel."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if not len(mean) == len(std) == images.shape[-3]:
        raise ValueError(f"{len(mean)} means and {len(std)} stds for {images.shape[-3]} channels")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def augment(
    batch: torch.Tensor, generator: torch.Generator, *, crop_padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop and horizontal flip, drawn per image from `generator`.

    The crop zero-pads each side by `crop_padding` pixels and cuts a window of the original size at
    a random offset (zero is black for images in [0, 1], the mean colour for normalised ones).
    Each image is flipped left-right with probability 1/2. The input batch is left unchanged.
    """
    if batch.ndim != 4:
        raise ValueError(f"augment expects a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
    if crop_padding < 0:
        raise ValueError(f"crop padding must be >= 0, got {crop_padding}")
    size, _, height, width = batch.shape
    out = batch
    if crop_padding:
        padded = F.pad(batch, (crop_padding,) * 4)
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, size), generator=generator, device=generator.device)
        offsets = offsets.to(batch.device)
        rows = offsets[0, :, None] + torch.arange(height, device=batch.device)
        cols = offsets[1, :, None] + torch.arange(width, device=batch.device)
        image = torch.arange(size, device=batch.device)[:, None, None]
        # Advanced indices around the channel slice put the channel axis last.
        out = padded[image, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if flip:
        flips = torch.rand(size, generator=generator, device=generator.device).to(batch.device) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


def image_batches(
    split: ImageSplit,
    indices: np.ndarray,
    *,
    batch_size: int,
    mean,
    std,
    generator: torch.Generator | None = None,
    augmentation: bool = False,
    device: torch.device | str = "cpu",
    transform=None,
):
    """A re-iterable source of (normalised images, labels) batches of `split[indices]`. With `generator` the order
    (and augmentation, where on) is drawn from it on every pass; without, the indices are taken in order. `transform`
    (morphing, for a holder) is applied to each normalised batch on `device`."""

    def iterate():
        order = (torch.randperm(len(indices), generator=generator).numpy() if generator is not None
                 else np.arange(len(indices)))
        for start in range(0, len(order), batch_size):
            chosen = indices[order[start : start + batch_size]]
            raw = torch.from_numpy(split.images[chosen])
            if augmentation and generator is not None:
                raw = augment(raw, generator)
            images = normalize(raw, mean, std).to(device)
            if transform is not None:
                images = transform(images)
            yield images, torch.from_numpy(split.labels[chosen]).to(device)

    return iterate


def partition(labels: np.ndarray, num_holders: int, scheme: str, *, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Split sample indices among `num_holders` data holders; every sample goes to exactly one.

    `iid`: shuffle, then cut into near-equal parts. `dirichlet:ALPHA`: label skew; for each class,
    the holders' shares are drawn from Dir(ALPHA) (small ALPHA: each holder sees few classes).
    Holders left with fewer than `min_size` samples are topped up one sample at a time, with the
    class the short holder's own shares favour most, from the holder richest in that class.
    Deterministic given `seed`. Returns one sorted index array per holder.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if isinstance(num_holders, bool) or int(num_holders) != num_holders or num_holders < 1:
        raise UsageError(f"the number of data holders must be a positive integer, got {num_holders!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if len(labels) < num_holders * min_size:
        raise UsageError(
            f"cannot give {num_holders} data holders at least {min_size} sample(s) each from "
            f"{len(labels)} samples; use at most {len(labels) // max(min_size, 1)} holders or a larger dataset"
        )
    rng = np.random.default_rng(seed)
    kind, _, argument = scheme.strip().lower().partition(":")
    if kind == "iid" and not argument:
        parts = np.array_split(rng.permutation(len(labels)), num_holders)
    elif kind == "dirichlet":
        parts = _dirichlet_parts(labels, num_holders, _parse_alpha(scheme, argument), min_size, rng)
    else:
        raise UsageError(
            f"unknown partition scheme {scheme!r}; expected 'iid' or 'dirichlet:ALPHA', e.g. dirichlet:0.5"
        )
    return [np.sort(part) for part in parts]


def split_holder(indices: np.ndarray, test_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one holder's indices into (train, test) at random.

    The test part has round(test_fraction * n) samples but never takes the last training sample,
    so a holder with a single sample has an empty test part. Pass a different seed per holder.
    """
    if not 0 <= test_fraction < 1:
        raise UsageError(f"the local test fraction must be in [0, 1), got {test_fraction}")
    shuffled = np.random.default_rng(seed).permutation(np.asarray(indices))
    num_test = min(int(test_fraction * len(shuffled) + 0.5), max(len(shuffled) - 1, 0))
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples of each class per holder, shaped (holders, classes)."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, part in zip(counts, parts):
        row[:] = np.bincount(labels[part], minlength=num_classes)
    return counts


def plot_class_counts(counts: np.ndarray, class_names, path) -> None:
    """Save a stacked bar chart of class counts per holder as a PNG."""
    # Imported here so that loading data does not pay for matplotlib; Figure alone needs no pyplot state.
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(counts)
    holders, classes = counts.shape
    palette = colormaps["tab10" if classes <= 10 else "tab20" if classes <= 20 else "viridis"].resampled(classes)
    figure = Figure(figsize=(min(5 + 0.3 * holders, 14), 4.5), layout="constrained")
    axes = figure.add_subplot()
    bottom = np.zeros(holders)
    for label, name in enumerate(class_names):
        short = name if len(name) <= 24 else name[:23] + "\u2026"
        top = bottom + counts[:, label]
        if holders <= _BAR_CHART_MAX_HOLDERS:
            axes.bar(np.arange(holders), counts[:, label], bottom=bottom, width=0.85, color=palette(label), label=short)
        else:  # thousands of bar patches take seconds to draw; one stepped area per class does not
            axes.stairs(
                top, np.arange(holders + 1) - 0.5, baseline=bottom, fill=True, color=palette(label), label=short
            )
        bottom = top
    axes.set_xlim(-0.5, holders - 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("data holder")
    axes.set_ylabel("samples")
    axes.set_title(f"Class counts per holder ({holders} holders, {int(counts.sum())} samples)")
    if classes <= 20:
        axes.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _parse_alpha(scheme: str, argument: str) -> float:
    try:
        alpha = float(argument)
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise UsageError(
            f"bad partition scheme {scheme!r}; ALPHA in dirichlet:ALPHA must be a number > 0, e.g. dirichlet:0.5"
        )
    return alpha


def _dirichlet_parts(
    labels: np.ndarray, num_holders: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes, class_sizes = np.unique(labels, return_counts=True)
    shares = rng.dirichlet(np.full(num_holders, alpha), size=len(classes))  # (classes, holders)
    bounds = np.round(np.cumsum(shares, axis=1) * class_sizes[:, None]).astype(np.int64)
    bounds[:, -1] = class_sizes
    counts = np.diff(bounds, axis=1, prepend=0)
    _top_up(counts, shares, min_size)
    # The top-up drains donors in index order; relabelling the exchangeable holders hides that order.
    counts = counts[:, rng.permutation(num_holders)]
    owner = np.empty(len(labels), dtype=np.int64)
    for label, class_counts_row in zip(classes, counts):
        members = rng.permutation(np.flatnonzero(labels == label))
        owner[members] = np.repeat(np.arange(num_holders), class_counts_row)
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_holders))[:-1])


def _top_up(counts: np.ndarray, shares: np.ndarray, min_size: int) -> None:
    """Move samples into holders below `min_size`, in place; the caller checked there are enough."""
    totals = counts.sum(axis=0)
    for holder in np.flatnonzero(totals < min_size):
        while totals[holder] < min_size:
            spare = np.where(totals > min_size, counts, 0)
            givable = spare.max(axis=1) > 0
            label = np.argmax(np.where(givable, shares[:, holder], -1.0))
            donor = np.argmax(spare[label])
            counts[label, donor] -= 1
            counts[label, holder] += 1
            totals[donor] -= 1
            totals[holder] += 1


def _load_digits() -> tuple[ImageSplit, ImageSplit, None]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    train, test = _stratified_split(labels, TEST_FRACTION, seed=_SPLIT_SEED)
    return ImageSplit(images[train], labels[train]), ImageSplit(images[test], labels[test]), None


def _stratified_split(labels: np.ndarray, test_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = [
        members[: int(test_fraction * len(members) + 0.5)]
        for members in (rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels))
    ]
    test_indices = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_indices), test_indices


def _load_cifar(kind: str, data_dir: Path, download: bool):
    import torchvision.datasets

    source = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    folder = data_dir / source.base_folder
    if not folder.is_dir():
        if not download:
            raise DataError(
                f"{kind} folder {folder} not found and download is off; expected the standard "
                f"{source.base_folder} folder from {source.url} extracted into {data_dir}"
            )
        try:
            source(root=data_dir, train=False, download=True)
        except (OSError, RuntimeError, http.client.HTTPException) as error:
            raise DataError(
                f"could not download {kind} from {source.url} into {folder} ({error}); "
                f"extract that archive into {data_dir} by hand or check the connection"
            ) from error
    # Read the pickles ourselves: torchvision's reader insists on the official MD5 sums.
    meta = _unpickle(folder / source.meta["filename"])
    class_names = tuple(str(name) for name in meta[source.meta["key"]])
    train = _cifar_split(folder, [name for name, _ in source.train_list], len(class_names))
    test = _cifar_split(folder, [name for name, _ in source.test_list], len(class_names))
    return train, test, None, class_names


def _cifar_split(folder: Path, file_names: list[str], num_classes: int) -> ImageSplit:
    images, labels = [], []
    for file_name in file_names:
        path = folder / file_name
        entry = _unpickle(path)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        except (KeyError, ValueError) as error:
            raise DataError(
                f"{path} is not a CIFAR batch ({error!r}); expected 'data' (N x 3072 uint8) and labels"
            ) from error
        if len(batch_labels) != len(data) or batch_labels.min() < 0 or batch_labels.max() >= num_classes:
            raise DataError(
                f"{path} has {len(batch_labels)} labels for {len(data)} images or labels outside 0..{num_classes - 1}"
            )
        images.append(data)
        labels.append(batch_labels)
    return ImageSplit(np.concatenate(images), np.concatenate(labels))


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing file {path}; expected the standard CIFAR python-version folder from torchvision")
    try:
        with path.open("rb") as file:
            entry = pickle.load(file, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"cannot read {path} ({error!r}); expected a CIFAR python-version pickle") from error
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}; expected a CIFAR python-version pickle (a dict)")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}


def _load_medmnist(name: str, data_dir: Path, download: bool):
    if name not in _MEDMNIST:
        raise DataError(f"unknown MedMNIST dataset {name!r}; expected one of the 2D sets: {', '.join(_MEDMNIST)}")
    md5, class_names = _MEDMNIST[name]
    path = data_dir / f"{name}.npz"
    if not path.is_file():
        if not download:
            raise DataError(f"{path} not found and download is off; expected the MedMNIST file {name}.npz there")
        _download(_MEDMNIST_URL.format(name=name), path, md5)
    train, test, val = _read_npz(path, multi_label_to_any=name == "chestmnist")
    for split in (train, test, val):
        if split is not None and split.labels.max() >= len(class_names):
            raise DataError(f"{path} has label {split.labels.max()}; {name} has {len(class_names)} classes")
    return train, test, val, class_names


def _download(url: str, target: Path, md5: str) -> None:
    """Fetch `url` into `target` through a temporary file, so a failed download leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _log.info("downloading %s to %s", url, target)
    descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(descriptor, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(
                f"the file downloaded from {url} has MD5 {digest.hexdigest()}, expected {md5}; not saved to {target}"
            )
        os.replace(partial, target)
    except (OSError, http.client.HTTPException) as error:
        raise DataError(
            f"could not download {url} to {target} ({error}); put the file there by hand or check the connection"
        ) from error
    finally:
        Path(partial).unlink(missing_ok=True)


def _read_npz(path: Path, *, multi_label_to_any: bool = False) -> tuple[ImageSplit, ImageSplit, ImageSplit | None]:
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an .npz file; for a folder of images (one subfolder per class) use "
                        f"--dataset folder:{path}")
    if not path.is_file():
        raise DataError(f"file not found: {path}; expected {_NPZ_LAYOUT}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot read {path} ({error}); expected {_NPZ_LAYOUT}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array; expected {_NPZ_LAYOUT}")
    with archive:
        prefixes = ["train", "test"]
        if "val_images" in archive.files or "val_labels" in archive.files:
            prefixes.append("val")
        arrays = {}
        for key in (f"{prefix}_{part}" for prefix in prefixes for part in ("images", "labels")):
            if key not in archive.files:
                raise DataError(
                    f"{path} has no key {key!r} (it has {', '.join(archive.files) or 'none'}); expected {_NPZ_LAYOUT}"
                )
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                raise DataError(f"cannot read {key!r} from {path} ({error}); expected {_NPZ_LAYOUT}") from error
    splits = [_npz_split(path, prefix, arrays, multi_label_to_any) for prefix in prefixes]
    shapes = {prefix: split.images.shape[1:] for prefix, split in zip(prefixes, splits)}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{path} mixes image shapes {shapes} across splits; expected one (C, H, W) for all")
    return splits[0], splits[1], splits[2] if len(splits) == 3 else None


def _npz_split(path: Path, prefix: str, arrays: dict[str, np.ndarray], multi_label_to_any: bool) -> ImageSplit:
    images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
    where = f"{path}: {prefix}_images"
    if images.dtype != np.uint8:
        raise DataError(f"{where} has dtype {images.dtype}; expected uint8 pixels 0..255")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where} has shape {images.shape}; expected (N, H, W) grey or (N, H, W, 3) colour")
    if len(images) == 0:
        raise DataError(f"{where} is empty; expected at least one image")
    where = f"{path}: {prefix}_labels"
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"{where} has dtype {labels.dtype}; expected integer class labels")
    if labels.ndim == 2 and labels.shape[1] > 1:
        if not multi_label_to_any:
            raise DataError(
                f"{where} has multi-label shape {labels.shape}; expected one class per image, (N,) or (N, 1) "
                "(for ChestMNIST use medmnist:chestmnist, which maps findings to one 'any finding' label)"
            )
        labels = labels.any(axis=1)
    elif labels.ndim == 2:
        labels = labels[:, 0]
    elif labels.ndim != 1:
        raise DataError(f"{where} has shape {labels.shape}; expected (N,) or (N, 1)")
    if len(labels) != len(images):
        raise DataError(f"{where} has {len(labels)} labels for {len(images)} images; expected one label per image")
    if labels.min() < 0:
        raise DataError(f"{where} has negative label {labels.min()}; expected class numbers 0, 1, ...")
    return ImageSplit(np.ascontiguousarray(images), labels.astype(np.int64))


def _load_folder(root: Path, image_size: int) -> tuple[ImageSplit, ImageSplit, tuple[str, ...]]:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}; expected a folder with one sub-folder of images per class")
    if {folder.name for folder in _visible_subfolders(root)} == {"train", "test"}:
        train_files, class_names = _class_tree(root / "train")
        test_files, test_class_names = _class_tree(root / "test")
        unknown = sorted(set(test_class_names) - set(class_names))
        if unknown:
            raise DataError(
                f"{root / 'test'} has classes {unknown} that {root / 'train'} lacks; expected the same class folders"
            )
        test_files = [(file, class_names.index(test_class_names[label])) for file, label in test_files]
        files = train_files + test_files
        test = np.arange(len(train_files), len(files))
        train = np.arange(len(train_files))
    else:
        files, class_names = _class_tree(root)
        train, test = _stratified_split(np.array([label for _, label in files]), TEST_FRACTION, seed=_SPLIT_SEED)
        if len(test) == 0:
            raise DataError(
                f"{root} has too few images ({len(files)}) for a {TEST_FRACTION:.0%} test split; add images"
            )
    pixels = [_resize(_read_image(file)[None], image_size)[0] for file, _ in files]
    if any(image.shape[0] == 3 for image in pixels):
        pixels = [np.repeat(image, 3 // image.shape[0], axis=0) for image in pixels]
    images = np.stack(pixels)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return ImageSplit(images[train], labels[train]), ImageSplit(images[test], labels[test]), class_names


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _class_tree(root: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(file, label) pairs and class names of a one-folder-per-class tree."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}; expected a folder with one sub-folder of images per class")
    class_folders = _visible_subfolders(root)
    if not class_folders:
        raise DataError(
            f"no class folders in {root}; expected one sub-folder of images per class, e.g. {root / 'normal'}"
        )
    files = []
    for label, folder in enumerate(class_folders):
        images = sorted(
            path for path in folder.rglob("*")
            if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )  # fmt: skip
        if not images:
            raise DataError(
                f"class folder {folder} has no images; expected files ending in {', '.join(sorted(_IMAGE_SUFFIXES))}"
            )
        files.extend((path, label) for path in images)
    return files, tuple(folder.name for folder in class_folders)


def _read_image(path: Path) -> np.ndarray:
    """Pixels as uint8, (1, H, W) for grey images and (3, H, W) for colour ones."""
    try:
        with Image.open(path) as image:
            image.load()
            pixels = _pixels(image)
    except Exception as error:  # any decoder failure on a user's file: report it with the file's name
        raise DataError(
            f"cannot read image {path} ({error}); expected a readable PNG, JPEG, BMP, TIFF or similar file"
        ) from error
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _pixels(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16"):
        return np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0)
        # Deeper images carry no range of their own: take them as 16-bit, or [0, 1] for floats.
        scale = 1 / 257 if top > 255 else 255 if image.mode == "F" and top <= 1 else 1
        return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency survives only through RGBA
    rgb = np.asarray(image.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0]
    return rgb


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize of uint8 (N, C, H, W) images to size x size."""
    if images.shape[2:] == (size, size):
        return images
    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = torch.tensor(images[start : start + _RESIZE_CHUNK], dtype=torch.float32)
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def _resize_split(split: ImageSplit | None, size: int) -> ImageSplit | None:
    return None if split is None else ImageSplit(_resize(split.images, size), split.labels)


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images scaled to [0, 1]."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].astype(np.float64) / 255
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
