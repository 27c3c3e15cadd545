"""Compare the data holders' keys: ``python -m simulation.keys compare``, and the same summary after a run.

One row per holder (DESIGN.md section 4; the figures are explained in docs/privacy.md):

* the key's public facts: fingerprint, family, block size ``q``, entry distribution, worst block
  condition number;
* cost: AugConv's memory against the plain first convolution's, and the forward time of AugConv on
  a batch of morphed images against the plain convolution on the same images unmorphed, measured
  side by side (interleaved, median of several repeats);
* brute force: log10 of the number of keys, for the channel order (``log10(beta!)``, 0 without a
  secret order) and for the matrix (``free entries * log10(values per entry)``: 255 values for integer
  entries, ``2^23`` for uniform ones, as float32 carries 23 mantissa bits; free entries are ``q^2``
  for ``repeated``, ``N*q`` for ``blocks``, ``N^2`` for ``dense``);
* known plaintext: the number of known images that determine the matrix (computed), and the
  PSNR/SSIM of the holder's other images decrypted with a matrix recovered from that many images
  (demonstrated, when enough sample images are given);
* how different morphed images look: SSIM and PSNR between each original and its morphed image,
  both in the domain layout, the morphed image min-max scaled to the original's range.

Holders' keys and channel orders are derived from one seed by :func:`holder_keys` and
:func:`channel_orders`, so that commands and simulation runs with the same seed get the same keys.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.augconv import AugConv
from clients.keys import ENTRY_DISTRIBUTIONS, FAMILIES, HolderKey
from clients.morphing import morph
from server.attacks.common import (
    display_image,
    new_output_folder,
    normalized_images,
    positive_int,
    run_command,
    to_domain,
    to_pixels,
    write_json,
)
from server.attacks.known_plaintext import attack_curve, known_images_needed
from simulation.data import ImageDataset, load_dataset
from simulation.errors import UsageError
from simulation.federation import derive_seed
from simulation.imagemetrics import psnr_per_image, scale_to_reference, ssim_per_image
from simulation.models import MODEL_NAMES, SplitModel, build_model

CHANNEL_ORDERS = ("federation", "holder", "none")
INTEGER_ENTRY_VALUES = 255
FLOAT32_MANTISSA_BITS = 23
FIGURE_MAX_HOLDERS = 10

DEFINITIONS = {
    "worst_condition": "largest 2-norm condition number among the key's blocks",
    "augconv_bytes": "memory of the holder's AugConv buffers; conv_bytes: the plain first convolution's parameters",
    "augconv_ms": "median forward time of AugConv on a batch of morphed images (ms); conv_ms: the plain convolution on the same images unmorphed, measured interleaved; morph_ms: morphing the batch",
    "augconv_step_ms": "median time of a training step (morphing, AugConv, backbone forward and backward; the first layer is frozen) on the batch (ms); step_ms: the same step of the plain model on the images unmorphed (None without a backbone)",
    "order_keyspace_log10": "log10(beta!) for a secret channel order of beta channels, 0 without one; order_guess_probability = 1/beta!",
    "matrix_keyspace_log10": "log10 of the number of matrices: free entries (repeated q^2, blocks N*q, dense N^2) times log10(values per entry): 255 for integer entries, 2^23 for uniform float entries (float32 mantissa)",
    "known_images_needed": "known (image, morphed image) pairs that determine the matrix on all image coordinates, for generic images: repeated ceil(q/(N/q)), blocks q, dense N (padding coordinates excluded)",
    "kpa_psnr_db": "known-plaintext demonstration: mean PSNR (dB) of the holder's other images decrypted with the matrix recovered from known_images_needed pairs; kpa_ssim likewise",
    "morph_ssim": "mean SSIM between original and morphed images in the domain layout, the morphed image min-max scaled to the original's range (pixel units, data range 1); morph_psnr_db likewise",
}


# ------------------------------------------------------------------------------------------ holders' keys
def holder_keys(
    image_shape: Sequence[int],
    holders: int,
    *,
    family: str = "repeated",
    block_size: int | None = None,
    entries: str = "uniform",
    padding: int = 0,
    seed: int,
) -> list[HolderKey]:
    """One key per holder, holder ``i``'s drawn from ``derive_seed(seed, "key", i)`` as in a simulation run."""
    if isinstance(holders, bool) or not isinstance(holders, int) or holders < 1:
        raise UsageError(f"the number of holders must be a positive integer, got {holders!r}")
    return [
        HolderKey.generate(image_shape, family=family, block_size=block_size, entries=entries, padding=padding, seed=derive_seed(seed, "key", i))
        for i in range(holders)
    ]


def channel_orders(channels: int, holders: int, mode: str, *, seed: int) -> list[list[int]] | None:
    """Secret channel orders as a simulation run draws them: ``federation`` (one for all), ``holder`` (one each), ``none``."""
    if mode not in CHANNEL_ORDERS:
        raise UsageError(f"unknown channel order mode {mode!r}; choose one of {', '.join(CHANNEL_ORDERS)}")
    if mode == "none":
        return None

    def draw(*labels) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(seed, "order", *labels))
        return torch.randperm(channels, generator=generator).tolist()

    if mode == "federation":
        return [draw()] * holders
    return [draw(i) for i in range(holders)]


# ------------------------------------------------------------------------------------------ key space
def order_keyspace_log10(channels: int) -> float:
    """log10(channels!): the number of channel orders a blind guess chooses from."""
    return math.lgamma(channels + 1) / math.log(10)


def matrix_keyspace_log10(key: HolderKey) -> float:
    """log10 of the number of morphing matrices of the key's family, block size and entry distribution."""
    if key.family == "repeated":
        free = key.block_size**2
    elif key.family == "blocks":
        free = key.size * key.block_size
    else:
        free = key.size**2
    per_entry = math.log10(INTEGER_ENTRY_VALUES) if key.entries == "integer" else FLOAT32_MANTISSA_BITS * math.log10(2)
    return free * per_entry


# ------------------------------------------------------------------------------------------ comparison
def compare_keys(
    keys: Sequence[HolderKey],
    first_conv: nn.Conv2d,
    images,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    order=None,
    backbone: nn.Module | None = None,
    timing_batch: int = 64,
    timing_repeats: int = 10,
    metric_images: int = 16,
    known_plaintext: bool = True,
    known_plaintext_test_images: int = 8,
) -> list[dict]:
    """One row of public figures per holder (see the module docstring and ``DEFINITIONS``).

    ``images`` are sample images (uint8, or normalised floats) of the dataset; they need not belong
    to the holders (the figures are properties of the keys). ``order`` is ``None``, one channel order
    for all holders, or one per holder. With ``backbone`` (whose input is the first layer's output, in
    the holders' channel order), a training step (morphing, forward and backward) is timed as well,
    against the same step on the plain model. The known-plaintext demonstration needs
    ``known_images_needed + known_plaintext_test_images`` images and is left out (``None``) otherwise.
    """
    if not keys:
        raise UsageError("no keys to compare; give at least one holder key")
    normalized = normalized_images(images, mean, std)
    orders = _orders_per_holder(order, len(keys), first_conv.out_channels)
    timing_images = normalized[torch.arange(timing_batch) % len(normalized)]
    shown = normalized[:metric_images]
    conv_bytes = sum(p.numel() * p.element_size() for p in first_conv.parameters())
    rows = []
    for index, (key, holder_order) in enumerate(zip(keys, orders)):
        augconv = AugConv.from_conv(first_conv, key, holder_order)
        timing = _time_side_by_side(first_conv, augconv, key, timing_images, timing_repeats, backbone)
        row = {
            "holder": index,
            **{field: value for field, value in key.summary().items() if field not in ("image_shape", "domain_shape")},
            "num_blocks": key.num_blocks,
            "expected_float32_error": key.expected_float32_error(),
            "augconv_bytes": augconv.memory_bytes,
            "conv_bytes": conv_bytes,
            **timing,
            "order_keyspace_log10": 0.0 if holder_order is None else order_keyspace_log10(first_conv.out_channels),
            "matrix_keyspace_log10": matrix_keyspace_log10(key),
            **_known_plaintext_demo(key, normalized, mean, std, known_plaintext, known_plaintext_test_images),
            **_morph_similarity(key, shown, mean, std),
        }
        row["order_guess_probability"] = 10.0 ** -row["order_keyspace_log10"]
        rows.append(row)
        del augconv
    return rows


def format_key_table(rows: Sequence[dict]) -> str:
    """The comparison as a terminal table."""
    header = (
        "holder", "fingerprint", "family", "q", "entries", "worst cond", "AugConv MiB", "x conv mem",
        "layer ms aug/plain", "step ms aug/plain", "log10 order", "log10 M", "known imgs", "KPA PSNR", "morph SSIM", "morph PSNR",
    )  # fmt: skip
    lines = []
    for row in rows:
        kpa, step = row.get("kpa_psnr_db"), row.get("augconv_step_ms")
        lines.append((
            str(row["holder"]), row["fingerprint"], row["family"], str(row["block_size"]), row["entries"],
            f"{row['worst_condition']:.3g}", f"{row['augconv_bytes'] / 2**20:.2f}", f"{row['augconv_bytes'] / row['conv_bytes']:.0f}",
            _ratio(row["augconv_ms"], row["conv_ms"]), "-" if step is None else _ratio(step, row["step_ms"]),
            f"{row['order_keyspace_log10']:.1f}", f"{row['matrix_keyspace_log10']:.4g}", str(row["known_images_needed"]),
            "-" if kpa is None else f"{kpa:.1f} dB", f"{row['morph_ssim']:.3f}", f"{row['morph_psnr_db']:.2f} dB",
        ))  # fmt: skip
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]

    def render(cells) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))

    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def write_key_report(
    rows: Sequence[dict],
    out_dir: str | Path,
    keys: Sequence[HolderKey],
    images,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    context: dict | None = None,
    figure_samples: int = 3,
    figure_holders: int = FIGURE_MAX_HOLDERS,
) -> tuple[Path, Path]:
    """Write ``keys.json`` (rows, context, definitions) and ``morph.png`` into ``out_dir``.

    ``morph.png`` shows ``figure_samples`` originals and their morphed images (scaled as for the
    SSIM) for the first ``figure_holders`` holders; the title says when holders are left out.
    """
    if [row["fingerprint"] for row in rows] != [key.fingerprint for key in keys]:
        raise UsageError("the rows and keys given to write_key_report do not match; pass the keys the rows were computed from")
    out_dir = Path(out_dir)
    json_path = write_json(out_dir / "keys.json", {"context": context or {}, "definitions": DEFINITIONS, "holders": list(rows)})
    figure_path = _plot_morphs(keys, normalized_images(images[:figure_samples], mean, std), mean, std, out_dir / "morph.png", figure_holders)
    return json_path, figure_path


# ------------------------------------------------------------------------------------------ internals
def _ratio(augmented: float, plain: float) -> str:
    return f"{augmented:.1f}/{plain:.1f} (x{augmented / plain:.2f})"


def _orders_per_holder(order, holders: int, channels: int) -> list:
    if order is None:
        return [None] * holders
    order = list(order)
    if order and np.ndim(order[0]) == 0:  # one order (list, array or tensor) for every holder
        return [order] * holders
    if len(order) != holders:
        raise UsageError(f"{len(order)} channel orders for {holders} holders; give one order for all or one per holder")
    return order


def _time_side_by_side(conv: nn.Conv2d, augconv: AugConv, key: HolderKey, images: torch.Tensor, repeats: int, backbone: nn.Module | None) -> dict:
    """Median times (ms), measured interleaved: plain conv on the images, morphing them, AugConv on the morphed
    images, and with a backbone a training step (forward and backward) of each model, morphing included."""
    morphed = morph(images, key)

    def forward_only(layer, inputs):
        with torch.no_grad():
            layer(inputs)

    def step(first, inputs):
        with torch.no_grad():
            features = first(inputs())
        backbone.zero_grad(set_to_none=True)
        backbone(features).float().square().mean().backward()

    calls = {
        "conv_ms": lambda: forward_only(conv, images),
        "morph_ms": lambda: forward_only(lambda x: morph(x, key), images),
        "augconv_ms": lambda: forward_only(augconv, morphed),
    }
    if backbone is not None:
        calls["step_ms"] = lambda: step(conv, lambda: images)
        calls["augconv_step_ms"] = lambda: step(augconv, lambda: morph(images, key))
    times = {field: [] for field in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(repeats):
        for field, call in calls.items():
            start = time.perf_counter()
            call()
            times[field].append(1000 * (time.perf_counter() - start))
    if backbone is not None:
        backbone.zero_grad(set_to_none=True)
    result = {"step_ms": None, "augconv_step_ms": None}
    return result | {field: statistics.median(values) for field, values in times.items()} | {"timing_batch": len(images)}


def _known_plaintext_demo(key: HolderKey, normalized: torch.Tensor, mean, std, enabled: bool, test_images: int) -> dict:
    needed = known_images_needed(key.family, key.block_size, key.image_shape, key.padding)
    result = {"known_images_needed": needed, "kpa_psnr_db": None, "kpa_ssim": None}
    if not enabled:
        return result
    if needed + test_images > len(normalized):
        return result | {"kpa_note": f"not demonstrated: needs {needed + test_images} sample images, {len(normalized)} given"}
    (point,) = attack_curve(key, normalized[: needed + test_images], mean=mean, std=std, known_counts=[needed], test_images=test_images)
    return result | {"kpa_psnr_db": point["psnr_db"], "kpa_ssim": point["ssim"], "kpa_matrix_error": point["matrix_error"]}


def _originals_and_morphs(key: HolderKey, normalized: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals and scaled morphed images, both in the domain layout and pixel units."""
    originals = to_pixels(to_domain(normalized, key.padding), mean, std)
    return originals, scale_to_reference(morph(normalized, key), originals)


def _morph_similarity(key: HolderKey, normalized: torch.Tensor, mean, std) -> dict:
    originals, morphed = _originals_and_morphs(key, normalized, mean, std)
    return {
        "morph_ssim": float(np.mean(ssim_per_image(originals, morphed, data_range=1.0))),
        "morph_psnr_db": float(np.mean(psnr_per_image(originals, morphed, data_range=1.0))),
        "metric_images": len(normalized),
    }


def _plot_morphs(keys, samples: torch.Tensor, mean, std, path: Path, max_holders: int) -> Path:
    from matplotlib.figure import Figure

    shown = list(keys)[:max_holders]
    columns = 2 * len(samples)
    figure = Figure(figsize=(1.3 * columns + 0.6, 1.35 * len(shown) + 0.6), layout="constrained")
    axes = figure.subplots(len(shown), columns, squeeze=False)
    grey = samples.shape[1] == 1
    for row, key in enumerate(shown):
        originals, morphed = _originals_and_morphs(key, samples, mean, std)
        for sample in range(len(samples)):
            for offset, (image, label) in enumerate(((originals[sample], "original"), (morphed[sample], "morphed"))):
                ax = axes[row, 2 * sample + offset]
                ax.imshow(display_image(image), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(label, fontsize=8)
        axes[row, 0].set_ylabel(f"holder {row}\n{key.family}, q={key.block_size}", fontsize=7)
    note = f" (first {len(shown)} of {len(keys)} holders)" if len(keys) > len(shown) else ""
    figure.suptitle(f"originals and morphed images{note}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------ setup shared by commands
@dataclass
class Setup:
    """A dataset, the model (first convolution and backbone) and the holders' keys and channel orders."""

    dataset: ImageDataset
    model_name: str
    model: SplitModel | None
    first_layer_source: str
    keys: list[HolderKey]
    orders: list[list[int]] | None
    seed: int

    @property
    def first_conv(self) -> nn.Conv2d | None:
        return None if self.model is None else self.model.first

    def describe(self) -> dict:
        conv = self.first_conv
        return {
            "dataset": self.dataset.name,
            "image_shape": list(self.dataset.image_shape),
            "model": self.model_name,
            "first_layer": self.first_layer_source,
            "conv": None if conv is None else {
                "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
                "padding": list(conv.padding) if not isinstance(conv.padding, str) else conv.padding, "bias": conv.bias is not None,
            },
            "channel_order": "none" if self.orders is None else ("federation" if all(o == self.orders[0] for o in self.orders) else "holder"),
            "seed": self.seed,
        }  # fmt: skip


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that set up the dataset, first layer and holders' keys (shared by the compare and attack commands)."""
    group = parser.add_argument_group("data, first layer and keys")
    group.add_argument("--dataset", default="digits", help="dataset spec as in simulation.data.load_dataset (default digits)")
    group.add_argument("--data-dir", type=Path, default=None, help="where datasets are found or downloaded")
    group.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    group.add_argument("--model", choices=MODEL_NAMES, default="cnn", help="model whose first convolution is used (default cnn)")
    group.add_argument("--first-layer", type=Path, default=None, help="load the first convolution from this checkpoint (a run's first_layer.pt: a dict whose 'first' is the conv's state dict); default: the model's random initialisation from --seed")
    group.add_argument("--key-family", choices=FAMILIES, default="repeated", help="key family (default repeated)")
    group.add_argument("--block-size", type=int, default=None, help="block size q (default: the domain width; dense keys use N)")
    group.add_argument("--entries", choices=ENTRY_DISTRIBUTIONS, default="uniform", help="entry distribution (default uniform)")
    group.add_argument("--padding", type=int, default=0, help="morph the image zero-padded by this many pixels (default 0; the MoLe code uses 1)")
    group.add_argument("--channel-order", choices=CHANNEL_ORDERS, default="federation", help="secret channel order (default federation)")
    group.add_argument("--seed", type=int, default=0, help="seed for keys, orders and the first layer (default 0)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 gives steadier timings on a busy machine)")


def setup_from_arguments(args: argparse.Namespace, *, holders: int, with_model: bool = True) -> Setup:
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, image_size=args.image_size)
    keys = holder_keys(
        dataset.image_shape, holders, family=args.key_family, block_size=args.block_size,
        entries=args.entries, padding=args.padding, seed=args.seed,
    )  # fmt: skip
    model, source = setup_model(args.model, dataset, seed=args.seed, path=args.first_layer) if with_model else (None, "not used")
    orders = None if model is None else channel_orders(model.first.out_channels, holders, args.channel_order, seed=args.seed)
    return Setup(dataset, args.model, model, source, keys, orders, args.seed)


def setup_model(name: str, dataset: ImageDataset, *, seed: int, path: Path | None = None) -> tuple[SplitModel, str]:
    """The model, initialised from ``seed``; its first convolution frozen, random or loaded from ``path``.

    ``path`` is a checkpoint with ``first`` (the convolution's state dict), such as a run's
    ``first_layer.pt``; a checkpoint's ``backbone`` is not used.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, in_channels=dataset.channels, num_classes=max(dataset.num_classes, 2), image_size=dataset.image_shape[1])
    source = f"random initialisation (seed {seed})"
    if path is not None:
        if not Path(path).is_file():
            raise UsageError(f"first-layer file {path} does not exist; fix the path or leave --first-layer out")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("first"), dict):
            raise UsageError(f"first-layer file {path} has no 'first' entry (the convolution's state dict); use a run's first_layer.pt")
        try:
            model.first.load_state_dict(checkpoint["first"])
        except RuntimeError as error:
            raise UsageError(f"first-layer file {path} does not fit the {name} model's first convolution ({str(error).splitlines()[0]}); use a file made for this model and dataset") from None
        source = f"loaded from {path}"
    model.first.requires_grad_(False)
    return model, source


# ------------------------------------------------------------------------------------------ command
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulation.keys", description="Inspect the data holders' morphing keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare",
        help="compare the holders' keys: cost, key space, known-plaintext break point, how different morphed images look",
        description="One row per holder: fingerprint, family, q, entries, worst condition number, AugConv memory and time against "
        "the plain first convolution, brute-force key space (log10), known images that break the key (computed and demonstrated), "
        "SSIM/PSNR between original and morphed images. Writes keys.json and morph.png to --out.",
    )
    compare.add_argument("--holders", type=int, default=3, help="number of data holders (default 3)")
    add_setup_arguments(compare)
    compare.add_argument("--samples", type=positive_int, default=16, help="images for the SSIM/PSNR columns (default 16)")
    compare.add_argument("--timing-batch", type=positive_int, default=64, help="batch size of the timing (default 64)")
    compare.add_argument("--timing-repeats", type=positive_int, default=10, help="timed repeats per measurement; the median is reported (default 10)")
    compare.add_argument("--no-known-plaintext", action="store_true", help="skip the known-plaintext demonstration")
    compare.add_argument("--out", type=Path, default=Path("results/keys"), help="output folder for keys.json and morph.png (default results/keys)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    new_output_folder(args.out, ("keys.json", "morph.png"))
    setup = setup_from_arguments(args, holders=args.holders)
    dataset = setup.dataset
    images = torch.from_numpy(np.concatenate([dataset.train.images, dataset.test.images]))
    rows = compare_keys(
        setup.keys, setup.first_conv, images, mean=dataset.mean, std=dataset.std, order=setup.orders,
        backbone=setup.model.backbone, timing_batch=args.timing_batch, timing_repeats=args.timing_repeats, metric_images=args.samples, known_plaintext=not args.no_known_plaintext,
    )  # fmt: skip
    print(format_key_table(rows))
    context = setup.describe() | {"torch_threads": torch.get_num_threads(), "sample_images": len(images)}
    json_path, figure_path = write_key_report(rows, args.out, setup.keys, images, mean=dataset.mean, std=dataset.std, context=context)
    print(f"wrote {json_path} and {figure_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
