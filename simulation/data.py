"""Image datasets, holder partitions and augmentation for the federated simulation.

Every dataset loads to uint8 arrays, channels first, with per-channel statistics computed on its
training split. Dataset specs (see `load_dataset`): `digits` (built in, no download), `cifar10`,
`cifar100`, `medmnist:NAME[@SIZE]` (the `medmnist` package's metadata), `npz:PATH` (MedMNIST `.npz`
layout, optionally with the images' sites), `folder:PATH` (one sub-folder of images per class) and
`sites:PATH` (one sub-folder per site, each with one sub-folder per class).

Partitions are Flower Datasets' partitioners (`flwr_datasets.partitioner`), applied offline to an
in-memory `datasets.Dataset` of the training split's labels (and sites): nothing is downloaded.
They are imported only when a partition is made, as they cost a few seconds of import time.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import http.client
import importlib.metadata
import importlib.util
import io
import logging
import math
import os
import pickle
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from simulation.errors import UsageError
from simulation.files import atomic_write_bytes

DATASET_CHOICES = (
    "digits (built in, 8x8 grey), cifar10, cifar100, medmnist:NAME[@SIZE] (e.g. medmnist:pneumoniamnist or "
    "medmnist:pneumoniamnist@128), npz:PATH (MedMNIST .npz layout, optionally with train_sites), folder:PATH "
    "(one sub-folder of images per class), sites:PATH (one sub-folder per site, each with one sub-folder per class)"
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
    sites: np.ndarray | None = None  # int64, (N,): each image's site, an index into ImageDataset.site_names

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
    site_names: tuple[str, ...] = ()  # the sites the data names, in holder order under --partition natural

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


def partition_cache_dir(data_dir: str | Path | None) -> Path:
    """Where a data directory's partitions are kept (see `partition`)."""
    return (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / "partitions"


def load_dataset(
    spec: str, *, data_dir: str | Path | None = None, image_size: int | None = None, download: bool = False
) -> ImageDataset:
    """Load a dataset by spec (see `DATASET_CHOICES`).

    - `digits`: scikit-learn's handwritten digits, 8x8 grey (0..16 scaled to 0..255), stratified
      80/20 train/test split with a fixed seed.
    - `cifar10`, `cifar100`: the standard `cifar-10-batches-py` / `cifar-100-python` folder in
      `data_dir`, downloaded there through torchvision when missing and `download` is true.
    - `medmnist:NAME[@SIZE]`: a 2D MedMNIST set as the `medmnist` package describes it (class
      names, task, split sizes, URL and MD5 of each size), read from `NAME.npz` (SIZE 28, the
      default) or `NAME_SIZE.npz` (MedMNIST+: 64, 128, 224) in `data_dir`, downloaded from
      MedMNIST's Zenodo record when missing and `download` is true. Multi-label sets (ChestMNIST)
      are refused: training here is single-label.
    - `npz:PATH`: a file in the MedMNIST layout (keys train_images, train_labels, test_images,
      test_labels, optional val_images, val_labels; uint8 images (N, H, W) or (N, H, W, 3);
      integer labels (N,) or (N, 1)). Class names are the label numbers. Optional `train_sites`
      (and `test_sites`): each image's site, integers or strings, one per image.
    - `folder:PATH`: one sub-folder per class (class names are the sorted folder names), images of
      any size, mode and common format. The dataset is grey if every image is grey (a grey mode,
      or equal colour channels), else RGB; alpha is dropped; 16-bit images are scaled to 8 bits.
      Images are squashed to `image_size` squares (32 unless given). The test split is the
      `test/` tree if PATH holds exactly `train/` and `test/`, else a stratified 20% share.
    - `sites:PATH`: one sub-folder per site (site names are the sorted folder names), each laid out
      as `folder:PATH` is (its own `train/` and `test/`, or a stratified 20% test share per site);
      the class names are those of every site together.

    `image_size` resizes every image to image_size x image_size (bilinear, antialiased). Bad or
    missing data raises `DataError`.
    """
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise UsageError(f"image size must be a positive integer, got {image_size!r}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    kind, _, argument = spec.strip().partition(":")
    kind = kind.lower()
    site_names: tuple[str, ...] = ()
    if kind == "digits" and not argument:
        name, (train, test, val), class_names = "digits", _load_digits(), tuple(str(d) for d in range(10))
    elif kind in ("cifar10", "cifar100") and not argument:
        name, (train, test, val, class_names) = kind, _load_cifar(kind, data_dir, download)
    elif kind == "medmnist" and argument:
        name, train, test, val, class_names = _load_medmnist(argument, data_dir, download)
    elif kind == "npz" and argument:
        path = Path(argument).expanduser()
        name = path.stem
        train, test, val, site_names = _read_npz(path)
        num_classes = 1 + max(int(split.labels.max()) for split in (train, test, val) if split is not None)
        class_names = tuple(str(label) for label in range(num_classes))
    elif kind in ("folder", "sites") and argument:
        path = Path(argument).expanduser()
        name = path.name
        load = _load_folder if kind == "folder" else _load_sites
        train, test, class_names, site_names = load(path, image_size or _FOLDER_IMAGE_SIZE)
        val = None
    else:
        raise DataError(f"unknown dataset {spec!r}; expected one of: {DATASET_CHOICES}")
    if image_size is not None:
        train, test, val = (_resize_split(split, image_size) for split in (train, test, val))
    mean, std = _channel_stats(train.images)
    return ImageDataset(name, train, test, val, len(class_names), class_names, mean, std, site_names)


def named_sites(spec: str) -> tuple[str, ...]:
    """The sites a dataset spec names, in holder order (holder i is site i under `--partition natural`), read
    without loading its images; () where it names none. What is wrong with a file is left to `load_dataset`."""
    kind, _, argument = spec.strip().partition(":")
    path = Path(argument).expanduser()
    if kind.lower() == "sites" and path.is_dir():
        return tuple(folder.name for folder in _visible_subfolders(path))
    if kind.lower() == "npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "train_sites" in archive.files:
                    return _site_codes(archive["train_sites"])[1]
        except (OSError, ValueError, EOFError, TypeError, AttributeError, zipfile.BadZipFile):
            pass
    return ()


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


# ------------------------------------------------------------------------------------------ partitions
@dataclass(frozen=True)
class PartitionArgument:
    """One positional argument of a partition scheme, as written after its name (`dirichlet:0.5`)."""

    name: str  # as --help shows it, e.g. ALPHA
    expected: str  # what a valid value is, for the error message
    parse: Callable[[str], Any]  # raises ValueError or KeyError on a bad value
    default: Any = None  # None: required


@dataclass(frozen=True)
class PartitionRequest:
    """What a Flower partitioner is built from: the scheme's argument values and the federation's shape."""

    values: tuple
    holders: int
    samples: int
    min_size: int
    seed: int


@dataclass(frozen=True)
class PartitionScheme:
    """A `--partition` scheme: a Flower Datasets partitioner, how its arguments are written and how it is built."""

    name: str
    flower: str  # the flwr_datasets.partitioner class
    meaning: str
    build: Callable[[type, PartitionRequest], Any]
    arguments: tuple[PartitionArgument, ...] = ()
    too_few_hint: str = "use fewer holders or a larger dataset"

    @property
    def usage(self) -> str:
        required = ",".join(argument.name for argument in self.arguments if argument.default is None)
        optional = [argument.name for argument in self.arguments if argument.default is not None]
        if not required and optional:
            return f"{self.name}[:{optional[0]}]" + "".join(f"[,{name}]" for name in optional[1:])
        return self.name + (f":{required}" if required else "") + "".join(f"[,{name}]" for name in optional)


def _checked(parse: Callable[[str], Any], valid: Callable[[Any], bool]) -> Callable[[str], Any]:
    def convert(text: str):
        value = parse(text)
        if not valid(value):
            raise ValueError(text)
        return value

    return convert


_positive_number = _checked(float, lambda value: math.isfinite(value) and value > 0)
_positive_integer = _checked(int, lambda value: value >= 1)
_ALPHA = PartitionArgument("ALPHA", "a number > 0", _positive_number)
_CLASS_MODES = ("random", "deterministic", "first-deterministic")
_SITE_COLUMN = "site"


def _equal_sizes(request: PartitionRequest) -> list[int]:
    return [len(part) for part in np.array_split(np.arange(request.samples), request.holders)]


PARTITION_SCHEMES: dict[str, PartitionScheme] = {scheme.name: scheme for scheme in (
    PartitionScheme("iid", "IidPartitioner", "shuffled, then cut into near-equal parts",
                    lambda flower, request: flower(request.holders)),
    PartitionScheme(
        "dirichlet", "DirichletPartitioner",
        "label skew: each class is shared among the holders in proportions drawn from Dir(ALPHA) (small ALPHA: "
        "few classes per holder), redrawn up to 10 times until every holder has its minimum; BALANCING true stops "
        "giving to a holder once it holds an even share (default false)",
        lambda flower, request: flower(request.holders, "label", request.values[0], min_partition_size=request.min_size,
                                       self_balancing=request.values[1], seed=request.seed),
        (_ALPHA, PartitionArgument("BALANCING", "true or false", lambda text: {"true": True, "false": False}[text], False)),
        "use a larger ALPHA, fewer holders or a larger dataset",
    ),
    PartitionScheme(
        "inner-dirichlet", "InnerDirichletPartitioner", "near-equal sizes, each holder's class mix drawn from Dir(ALPHA)",
        lambda flower, request: flower(_equal_sizes(request), "label", request.values[0], seed=request.seed),
        (_ALPHA,),
    ),
    PartitionScheme(
        "pathological", "PathologicalPartitioner",
        "each holder gets CLASSES classes, each class split evenly among the holders that have it; MODE random "
        "(the default; a class no holder drew stays unused), deterministic (holder i: classes i to i+CLASSES-1) or "
        "first-deterministic (holder i's first class is class i)",
        lambda flower, request: flower(request.holders, "label", request.values[0], request.values[1], seed=request.seed),
        (PartitionArgument("CLASSES", "a positive integer", _positive_integer),
         PartitionArgument("MODE", " or ".join(_CLASS_MODES), _checked(str, _CLASS_MODES.__contains__), "random")),
        "use fewer holders or MODE deterministic",
    ),
    PartitionScheme(
        "shard", "ShardPartitioner",
        "sorted by class, cut into shards, SHARDS random shards per holder (default 2, as McMahan et al.) of SIZE "
        "images each (default: the largest that gives every holder its shards); the images left over stay unused",
        lambda flower, request: flower(request.holders, "label", num_shards_per_partition=request.values[0],
                                       shard_size=request.values[1] or None, seed=request.seed),
        (PartitionArgument("SHARDS", "a positive integer", _positive_integer, 2),
         PartitionArgument("SIZE", "a positive integer", _positive_integer, 0)),
        "use fewer holders, fewer SHARDS or a smaller SIZE",
    ),
    PartitionScheme("linear", "LinearPartitioner", "holder i gets a share proportional to i + 1",
                    lambda flower, request: flower(request.holders)),
    PartitionScheme("square", "SquarePartitioner", "holder i gets a share proportional to (i + 1)^2",
                    lambda flower, request: flower(request.holders), too_few_hint="use fewer holders or linear"),
    PartitionScheme("exponential", "ExponentialPartitioner", "holder i gets a share proportional to e^(i + 1)",
                    lambda flower, request: flower(request.holders),
                    too_few_hint="use fewer holders (e.g. 6 for a thousand images), square or linear"),
    PartitionScheme(
        "natural", "NaturalIdPartitioner",
        "holder i is site i of data that names its sites (an npz with train_sites, or sites:PATH; sites in sorted "
        "order); the number of holders follows the sites",
        lambda flower, request: flower(partition_by=_SITE_COLUMN),
        too_few_hint="merge that site with another or lower --public-fraction",
    ),
)}  # fmt: skip

PARTITION_HELP = "; ".join(f"{scheme.usage}: {scheme.meaning}" for scheme in PARTITION_SCHEMES.values())
"""Every scheme with its arguments, for --help."""


def parse_partition(scheme: str) -> tuple[PartitionScheme, tuple]:
    """The scheme a `--partition` value names and its argument values (defaults filled in); UsageError if malformed."""
    if not isinstance(scheme, str):
        raise UsageError(f"--partition must be a string such as iid or dirichlet:0.5, got {scheme!r}")
    name, separator, text = scheme.strip().lower().partition(":")
    if name not in PARTITION_SCHEMES:
        close = difflib.get_close_matches(name, PARTITION_SCHEMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown partition scheme {scheme!r}; {hint}expected one of "
                         f"{', '.join(known.usage for known in PARTITION_SCHEMES.values())}")
    chosen = PARTITION_SCHEMES[name]
    given = [part.strip() for part in text.split(",")] if separator else []
    if len(given) > len(chosen.arguments):
        takes = f"at most {len(chosen.arguments)} argument(s)" if chosen.arguments else "no argument"
        raise UsageError(f"bad partition scheme {scheme!r}; {chosen.name} takes {takes}: {chosen.usage}")
    values = []
    for position, argument in enumerate(chosen.arguments):
        if position >= len(given):
            if argument.default is None:
                raise UsageError(f"bad partition scheme {scheme!r}; {argument.name} is required: {chosen.usage}")
            values.append(argument.default)
            continue
        try:
            values.append(argument.parse(given[position]))
        except (ValueError, KeyError):
            raise UsageError(f"bad partition scheme {scheme!r}; {argument.name} in {chosen.usage} must be "
                             f"{argument.expected}, got {given[position]!r}") from None
    return chosen, tuple(values)


def natural_sites(dataset: ImageDataset, holders: int, scheme: str) -> np.ndarray | None:
    """The training images' sites where `scheme` is natural (checking that there is one holder per site), else None."""
    if parse_partition(scheme)[0].name != "natural":
        return None
    if dataset.train.sites is None:
        raise UsageError(f"--partition natural needs data that names each image's site (an npz with train_sites, or "
                         f"sites:PATH); {dataset.name} names none, so pick another --partition")
    count = len(dataset.site_names)
    if holders != count:
        listed = ", ".join(dataset.site_names[:5]) + (", ..." if count > 5 else "")
        raise UsageError(f"--partition natural makes one holder per site, and {dataset.name} has {count} sites "
                         f"({listed}); --holders {holders} disagrees: leave --holders out or set it to {count}")
    return dataset.train.sites


def partition(
    labels: np.ndarray,
    num_holders: int,
    scheme: str,
    *,
    seed: int,
    min_size: int = 1,
    sites: np.ndarray | None = None,
    cache_dir: Path | None = None,
) -> list[np.ndarray]:
    """Split sample indices among `num_holders` data holders with a Flower Datasets partitioner (see
    `PARTITION_SCHEMES`); a sample goes to one holder at most (some schemes leave a few unused, and log how many).

    Applied offline to a `datasets.Dataset` of the labels (and, for `natural`, `sites`: each sample's site number,
    holder k getting site k), in an order shuffled from `seed`, with the partitioner seeded from it too:
    deterministic given `seed`. Every holder gets at least `min_size` samples: Dirichlet redraws until it does (as
    Flower does, up to 10 times), and any other shortfall is a UsageError. Returns one sorted index array per holder.

    With `cache_dir`, the split is kept there, keyed by everything it depends on, so that the other processes of a
    run (each Ray worker, each ClientApp process) read it instead of importing Flower Datasets (about 2 s each).
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
    chosen, values = parse_partition(scheme)
    if chosen.name == "natural":
        sites = None if sites is None else np.asarray(sites)
        if sites is None or len(sites) != len(labels):
            raise UsageError("--partition natural needs each sample's site; use data that names its sites")
        if len(sites) and (sites.min() < 0 or sites.max() >= num_holders):
            raise UsageError(f"--partition natural: site numbers must lie in 0..{num_holders - 1}, one per holder")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    columns = {"index": order, "label": np.unique(labels, return_inverse=True)[1][order]}
    if chosen.name == "natural":
        columns[_SITE_COLUMN] = np.asarray(sites)[order]
    request = PartitionRequest(values, num_holders, len(labels), min_size, seed=int(rng.integers(2**63)))
    cached = None if cache_dir is None else _partition_cache_file(cache_dir, columns, scheme, request)
    parts = None if cached is None else _read_cached_parts(cached, request)
    if parts is None:
        parts = _flower_parts(chosen, request, columns)
        if cached is not None:
            _cache_parts(cached, parts)
    sizes = [len(part) for part in parts]
    short = int(np.argmin(sizes))
    if sizes[short] < min_size:
        raise UsageError(f"--partition {scheme} gives holder {short} {sizes[short]} of {len(labels)} samples, fewer "
                         f"than the {min_size} each of {num_holders} holders needs; {chosen.too_few_hint}")
    if sum(sizes) < len(labels):
        _log.warning("--partition %s leaves %d of %d samples to no holder", scheme, len(labels) - sum(sizes),
                     len(labels))
    return parts


def _flower_parts(chosen: PartitionScheme, request: PartitionRequest, columns: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Each holder's sorted indices (the `index` column of its Flower partition)."""
    # The table lives in memory and nothing is fetched; offline mode makes sure no library tries the Hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from flwr_datasets import partitioner as flower

    partitioner = chosen.build(getattr(flower, chosen.flower), request)
    partitioner.dataset = datasets.Dataset.from_dict(columns)
    # Flower warns on each Dirichlet redraw and pyarrow on the shard sort, and NaturalIdPartitioner draws a
    # progress bar: the outcome is checked and reported here instead.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            parts = [partitioner.load_partition(part)["index"] for part in range(partitioner.num_partitions)]
        except (ValueError, TypeError) as error:
            raise UsageError(f"--partition {chosen.name}: Flower's {chosen.flower} cannot split {request.samples} "
                             f"samples among {request.holders} holders with at least {request.min_size} each "
                             f"({error}); {chosen.too_few_hint}") from None
    if chosen.name == "natural":  # Flower numbers the sites it finds; holder k is site k, also next to an empty one
        by_site = dict(zip(partitioner.partition_id_to_natural_id.values(), parts))
        parts = [by_site.get(site, []) for site in range(request.holders)]
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _partition_cache_file(cache_dir: Path, columns: dict[str, np.ndarray], scheme: str, request: PartitionRequest) -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes())  # any change to how splits are made starts afresh
    for package in ("flwr-datasets", "datasets", "numpy"):
        digest.update(importlib.metadata.version(package).encode())
    digest.update(repr((scheme.strip().lower(), request.holders, request.min_size, request.seed)).encode())
    for name in sorted(columns):
        digest.update(name.encode() + np.ascontiguousarray(columns[name], dtype=np.int64).tobytes())
    return Path(cache_dir).expanduser() / f"{digest.hexdigest()[:32]}.npz"


def _read_cached_parts(path: Path, request: PartitionRequest) -> list[np.ndarray] | None:
    """The split kept at `path`; None where there is none or it is not a whole, plausible one."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            indices, sizes = archive["indices"], archive["sizes"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    if len(sizes) != request.holders or sizes.min(initial=0) < 0 or sizes.sum() != len(indices):
        return None
    if len(indices) and (indices.min() < 0 or indices.max() >= request.samples):
        return None
    return np.split(indices.astype(np.int64), np.cumsum(sizes)[:-1])


def _cache_parts(path: Path, parts: list[np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, indices=np.concatenate(parts), sizes=np.array([len(part) for part in parts]))
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as error:  # a read-only cache costs the other processes the import, nothing else
        _log.info("cannot keep the partition in %s (%s)", path, error)


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


def plot_class_counts(counts: np.ndarray, class_names, path, *, scheme: str | None = None) -> None:
    """Save a stacked bar chart of class counts per holder as a PNG; `scheme` (the --partition) goes in the title."""
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
    axes.set_ylabel("images (the holder's train and test splits)")
    split = f"--partition {scheme}, " if scheme else ""
    axes.set_title(f"Class counts per holder\n{split}{holders} holders, {int(counts.sum())} private images", fontsize=10)
    if classes <= 20:
        axes.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


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
                f"{kind} folder {folder} not found and download is off; pass --download to fetch it from "
                f"{source.url} into {data_dir}, or extract that archive there by hand"
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


@functools.lru_cache(maxsize=1)
def _medmnist_info() -> dict:
    """The medmnist package's metadata (`medmnist.INFO`), read from its `info` module alone: `import medmnist` also
    imports its evaluator and through it scikit-learn's metrics, 2 s of every holder process's first message. The
    module creates ~/.medmnist, the package's default root."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the medmnist package is not installed; pip install medmnist (it describes the MedMNIST sets)")
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    module_spec = importlib.util.spec_from_file_location("_mple_medmnist_info", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.INFO


def _load_medmnist(argument: str, data_dir: Path, download: bool):
    """A 2D MedMNIST set at one of its sizes, as the medmnist package's metadata describes it."""
    name, _, size_text = argument.strip().lower().partition("@")
    medmnist_info = _medmnist_info()
    single_label = {key: info for key, info in medmnist_info.items()
                    if not info["python_class"].endswith("3D") and "multi-label" not in info["task"]}
    info = medmnist_info.get(name)
    if info is not None and "multi-label" in info["task"]:
        raise DataError(
            f"medmnist:{name} is {info['task']} ({len(info['label'])} findings, several per image), and training here "
            "is single-label (one class per image), so it is refused; save a single-label version (e.g. any finding: "
            "labels.any(axis=1)) as an .npz and use npz:PATH"
        )
    if name not in single_label:
        what = "a 3D set; only 2D sets are supported" if info is not None else "not a MedMNIST set"
        raise DataError(f"medmnist:{name} is {what}; expected one of {', '.join(single_label)}")
    sizes = [28] + [int(key[len("url_"):]) for key in info if key.startswith("url_")]
    if size_text not in ("", *map(str, sizes)):
        raise DataError(f"medmnist:{argument} asks for size {size_text!r}; {name} comes in sizes "
                        f"{', '.join(map(str, sizes))} (e.g. medmnist:{name}@{sizes[-1]})")
    suffix = f"_{size_text}" if size_text not in ("", "28") else ""
    path = data_dir / f"{name}{suffix}.npz"
    if not path.is_file():
        if not download:
            raise DataError(f"{path} not found and download is off; pass --download to fetch the MedMNIST file "
                            f"{path.name} ({info['url' + suffix]}) into {data_dir}, or put it there by hand")
        _download(info["url" + suffix], path, info["MD5" + suffix])
    train, test, val, _ = _read_npz(path)
    class_names = tuple(info["label"][str(label)] for label in range(len(info["label"])))
    found = {"train": len(train), "val": 0 if val is None else len(val), "test": len(test)}
    side = int(size_text or 28)
    if found != info["n_samples"] or train.images.shape[1:] != (info["n_channels"], side, side):
        raise DataError(
            f"{path} holds {found} images of shape {train.images.shape[1:]}; MedMNIST's {name}{suffix} has "
            f"{info['n_samples']} of shape {(info['n_channels'], side, side)}: not the official file (for other data "
            f"use npz:{path})"
        )
    for split in (train, test, val):
        if split is not None and split.labels.max() >= len(class_names):
            raise DataError(f"{path} has label {split.labels.max()}; {name} has {len(class_names)} classes")
    return f"{name}{suffix}", train, test, val, class_names


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


def _read_npz(path: Path) -> tuple[ImageSplit, ImageSplit, ImageSplit | None, tuple[str, ...]]:
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
        site_keys = [key for key in ("train_sites", "test_sites") if key in archive.files]
        for key in [f"{prefix}_{part}" for prefix in prefixes for part in ("images", "labels")] + site_keys:
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                raise DataError(f"cannot read {key!r} from {path} ({error}); expected {_NPZ_LAYOUT}") from error
    splits = [_npz_split(path, prefix, arrays) for prefix in prefixes]
    shapes = {prefix: split.images.shape[1:] for prefix, split in zip(prefixes, splits)}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{path} mixes image shapes {shapes} across splits; expected one (C, H, W) for all")
    names: tuple[str, ...] = ()
    if "train_sites" in arrays:
        train_sites, test_sites = (_npz_sites(path, key, arrays, len(split)) for key, split in
                                   (("train_sites", splits[0]), ("test_sites", splits[1])))
        if test_sites is not None and (train_sites.dtype.kind == "U") != (test_sites.dtype.kind == "U"):
            raise DataError(f"{path}: train_sites holds {train_sites.dtype} and test_sites {test_sites.dtype}; "
                            "expected the same kind of site names (both integers or both strings)")
        codes, names = _site_codes(train_sites, test_sites)
        if test_sites is not None and codes[1].min(initial=0) < 0:
            unknown = sorted(set(test_sites.tolist()) - set(train_sites.tolist()))
            raise DataError(f"{path}: test_sites names sites {unknown[:5]} that train_sites lacks; expected the "
                            "test images' sites among the training images' sites")
        splits[:2] = [ImageSplit(split.images, split.labels, sites) for split, sites in zip(splits, codes)]
    elif "test_sites" in arrays:
        raise DataError(f"{path} has test_sites but no train_sites; expected both, or train_sites alone")
    return splits[0], splits[1], splits[2] if len(splits) == 3 else None, names


def _npz_sites(path: Path, key: str, arrays: dict[str, np.ndarray], count: int) -> np.ndarray | None:
    """A split's site array, checked: one integer or string per image."""
    if key not in arrays:
        return None
    sites = arrays[key]
    if sites.ndim == 2 and sites.shape[1] == 1:
        sites = sites[:, 0]
    if sites.ndim != 1 or len(sites) != count or not (np.issubdtype(sites.dtype, np.integer) or sites.dtype.kind == "U"):
        raise DataError(f"{path}: {key} has shape {sites.shape} and dtype {sites.dtype}; expected one site per image, "
                        f"integers or strings of shape ({count},)")
    return sites


def _site_codes(train_sites: np.ndarray, test_sites: np.ndarray | None = None):
    """((train codes, test codes or None), site names): codes index the sorted site names (sorted as numbers for
    numeric sites); a test site missing from the training sites gets code -1."""
    names, train_codes = np.unique(train_sites, return_inverse=True)
    test_codes = None
    if test_sites is not None:
        positions = np.clip(np.searchsorted(names, test_sites), 0, len(names) - 1)
        test_codes = np.where(names[positions] == test_sites, positions, -1)
    return (train_codes.astype(np.int64), test_codes), tuple(str(name) for name in names)


def _npz_split(path: Path, prefix: str, arrays: dict[str, np.ndarray]) -> ImageSplit:
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
        raise DataError(
            f"{where} has multi-label shape {labels.shape}; expected one class per image, (N,) or (N, 1): training "
            "here is single-label"
        )
    if labels.ndim == 2:
        labels = labels[:, 0]
    elif labels.ndim != 1:
        raise DataError(f"{where} has shape {labels.shape}; expected (N,) or (N, 1)")
    if len(labels) != len(images):
        raise DataError(f"{where} has {len(labels)} labels for {len(images)} images; expected one label per image")
    if labels.min() < 0:
        raise DataError(f"{where} has negative label {labels.min()}; expected class numbers 0, 1, ...")
    return ImageSplit(np.ascontiguousarray(images), labels.astype(np.int64))


def _load_folder(root: Path, image_size: int):
    """(train, test, class names, no site names) of one class tree, or of its train/ and test/ trees."""
    return _load_trees([root], image_size, with_sites=False)


def _load_sites(root: Path, image_size: int):
    """(train, test, class names, site names) of one folder per site, each laid out as `_load_folder` reads one."""
    expected = "one sub-folder per site, each with one sub-folder of images per class"
    if not root.is_dir():
        raise DataError(f"site folder not found: {root}; expected {expected}")
    site_folders = _visible_subfolders(root)
    if not site_folders:
        raise DataError(f"no site folders in {root}; expected {expected}, e.g. {root / 'hospital-a' / 'normal'}")
    return _load_trees(site_folders, image_size, with_sites=True)


def _load_trees(roots: list[Path], image_size: int, *, with_sites: bool):
    files, class_of, site_of, is_test = [], [], [], []
    for site, root in enumerate(roots):
        tree, tree_test = _split_tree(root)
        files += [path for path, _ in tree]
        class_of += [name for _, name in tree]
        site_of += [site] * len(tree)
        is_test.append(tree_test)
    is_test = np.concatenate(is_test)
    class_names = tuple(sorted({name for name, test in zip(class_of, is_test) if not test}))
    labels = np.array([class_names.index(name) for name in class_of], dtype=np.int64)
    pixels = [_resize(_read_image(file)[None], image_size)[0] for file in files]
    if any(image.shape[0] == 3 for image in pixels):
        pixels = [np.repeat(image, 3 // image.shape[0], axis=0) for image in pixels]
    images = np.stack(pixels)
    sites = np.array(site_of, dtype=np.int64)
    train, test = (
        ImageSplit(images[chosen], labels[chosen], sites[chosen] if with_sites else None)
        for chosen in (~is_test, is_test)
    )
    return train, test, class_names, tuple(root.name for root in roots) if with_sites else ()


def _split_tree(root: Path) -> tuple[list[tuple[Path, str]], np.ndarray]:
    """(image file, class name) pairs of a one-folder-per-class tree, or of its train/ and test/ trees, and which of
    them are test images: the test/ tree's, or else a stratified share."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}; expected a folder with one sub-folder of images per class")
    if {folder.name for folder in _visible_subfolders(root)} == {"train", "test"}:
        train, test = _class_tree(root / "train"), _class_tree(root / "test")
        unknown = sorted({name for _, name in test} - {name for _, name in train})
        if unknown:
            raise DataError(
                f"{root / 'test'} has classes {unknown} that {root / 'train'} lacks; expected the same class folders"
            )
        return train + test, np.arange(len(train) + len(test)) >= len(train)
    files = _class_tree(root)
    _, test = _stratified_split(np.array([name for _, name in files]), TEST_FRACTION, seed=_SPLIT_SEED)
    if len(test) == 0:
        raise DataError(f"{root} has too few images ({len(files)}) for a {TEST_FRACTION:.0%} test split; add images")
    return files, np.isin(np.arange(len(files)), test)


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _class_tree(root: Path) -> list[tuple[Path, str]]:
    """(file, class name) pairs of a one-folder-per-class tree."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}; expected a folder with one sub-folder of images per class")
    class_folders = _visible_subfolders(root)
    if not class_folders:
        raise DataError(
            f"no class folders in {root}; expected one sub-folder of images per class, e.g. {root / 'normal'}"
        )
    files = []
    for folder in class_folders:
        images = sorted(
            path for path in folder.rglob("*")
            if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )  # fmt: skip
        if not images:
            raise DataError(
                f"class folder {folder} has no images; expected files ending in {', '.join(sorted(_IMAGE_SUFFIXES))}"
            )
        files.extend((path, folder.name) for path in images)
    return files


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
    return None if split is None else ImageSplit(_resize(split.images, size), split.labels, split.sites)


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
