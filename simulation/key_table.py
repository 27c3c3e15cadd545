"""The key comparison: one row of public figures per data holder, as a table, keys.json and morph.png.

Library: ``python -m simulation.keys compare`` and a run's report (simulation.report) call it. One row per holder
(DESIGN.md section 4; the figures are explained in docs/privacy.md):

* the key's public facts: fingerprint, family, block size ``q``, entry distribution, worst block
  condition number;
* cost: AugConv's memory against the plain first convolution's, and the forward time of AugConv on
  a batch of morphed images against the plain convolution on the same images unmorphed, measured
  side by side (interleaved, median of several repeats);
* brute force: log10 of the number of keys, for the channel order (``log10(beta!)``, 0 without a
  secret order) and for the matrix (``free entries * log10(values per entry)``: 255 values for integer
  entries, ``2^23`` for uniform ones, as float32 carries 23 mantissa bits; free entries are ``q^2``
  for ``repeated``, ``N*q`` for ``blocks``, ``N^2`` for ``dense``);
* known plaintext: the number of known images that determine the matrix for generic images (computed),
  and a demonstration on the sample images: how many of them it took to span the decrypted images
  (real images can span less than generic ones: digits' border columns are mostly background), the rank
  they reached, and the PSNR/SSIM of the decrypted images; the row says which sample images it used;
* how different morphed images look: SSIM and PSNR between each original and its morphed image,
  both in the domain layout, the morphed image min-max scaled to the original's range.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.augconv import AugConv
from clients.keys import HolderKey
from clients.morphing import morph
from server.attacks.common import display_image, normalized_images, to_domain, to_pixels, write_json
from server.attacks.known_plaintext import (
    attack_curve,
    full_rank,
    known_images_needed,
    known_images_spanning,
    plaintext_rank,
)
from simulation.errors import UsageError
from simulation.imagemetrics import psnr_per_image, scale_to_reference, ssim_per_image

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
    "kpa_images": "which sample images the known-plaintext demonstration used: the first kpa_known_images as known (image, morphed image) pairs, the last ones decrypted and scored",
    "kpa_known_images": "known pairs the demonstration used: the smallest count of the first sample images whose equations span the decrypted images' (so that those decrypt exactly), measured on these images; it differs from known_images_needed when the images are not generic (digits' first and last columns are mostly background, so most images' rows span 7 of a repeated key's 8 directions or fewer); known_images_needed when no count spans them (kpa_note says so)",
    "kpa_rank": "directions of the matrix the kpa_known_images pairs determine (rank of their equations, the attack's cut-off), out of kpa_full_rank (all image coordinates); kpa_needed_rank likewise with known_images_needed pairs",
    "kpa_psnr_db": "mean PSNR (dB) of the decrypted images with the matrix recovered from kpa_known_images pairs; kpa_ssim and kpa_matrix_error likewise; kpa_needed_psnr_db with known_images_needed pairs, whose images may leave the decrypted ones partly outside their span",
    "morph_ssim": "mean SSIM between original and morphed images in the domain layout, the morphed image min-max scaled to the original's range (pixel units, data range 1); morph_psnr_db likewise",
}


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
    sample_images: str = "sample images",
) -> list[dict]:
    """One row of public figures per holder (see the module docstring and ``DEFINITIONS``).

    ``images`` are sample images (uint8, or normalised floats) of the dataset; they need not belong
    to the holders (the figures are properties of the keys). ``order`` is ``None``, one channel order
    for all holders, or one per holder. With ``backbone`` (whose input is the first layer's output, in
    the holders' channel order), a training step (morphing, forward and backward) is timed as well,
    against the same step on the plain model. The known-plaintext demonstration needs
    ``known_images_needed + known_plaintext_test_images`` images and is left out (``None``) otherwise:
    it decrypts the last ``known_plaintext_test_images`` images with a matrix recovered from the fewest
    first images that span them (``kpa_known_images``), and from ``known_images_needed``; ``sample_images``
    names the images in the rows' ``kpa_images`` (e.g. "test split images" for a run's first 64).
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
            **_known_plaintext_demo(key, normalized, mean, std, known_plaintext, known_plaintext_test_images, sample_images),
            **_morph_similarity(key, shown, mean, std),
        }
        row["order_guess_probability"] = 10.0 ** -row["order_keyspace_log10"]
        rows.append(row)
        del augconv
    return rows


def format_key_table(rows: Sequence[dict]) -> str:
    """The comparison as a terminal table, with a line saying which images the known-plaintext demonstration used.

    ``known imgs`` is the count for generic images; ``KPA known`` the count the demonstration needed on its images,
    with the rank their equations reached, and ``KPA PSNR`` what that many decrypt.
    """
    header = (
        "holder", "fingerprint", "family", "q", "entries", "worst cond", "AugConv MiB", "x conv mem",
        "layer ms aug/plain", "step ms aug/plain", "log10 order", "log10 M", "known imgs", "KPA known", "KPA PSNR",
        "morph SSIM", "morph PSNR",
    )  # fmt: skip
    lines = []
    for row in rows:
        kpa, step, used = row.get("kpa_psnr_db"), row.get("augconv_step_ms"), row.get("kpa_known_images")
        lines.append((
            str(row["holder"]), row["fingerprint"], row["family"], str(row["block_size"]), row["entries"],
            f"{row['worst_condition']:.3g}", f"{row['augconv_bytes'] / 2**20:.2f}", f"{row['augconv_bytes'] / row['conv_bytes']:.0f}",
            _ratio(row["augconv_ms"], row["conv_ms"]), "-" if step is None else _ratio(step, row["step_ms"]),
            f"{row['order_keyspace_log10']:.1f}", f"{row['matrix_keyspace_log10']:.4g}", str(row["known_images_needed"]),
            "-" if used is None else f"{used} (rank {row['kpa_rank']}/{row['kpa_full_rank']})",
            "-" if kpa is None else f"{kpa:.1f} dB", f"{row['morph_ssim']:.3f}", f"{row['morph_psnr_db']:.2f} dB",
        ))  # fmt: skip
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]

    def render(cells) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))

    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines), *_demonstration_notes(rows)])


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


def _known_plaintext_demo(key: HolderKey, normalized: torch.Tensor, mean, std, enabled: bool, test_images: int,
                          sample_images: str) -> dict:
    """Known pairs from the first sample images, the last `test_images` decrypted: as few known images as span
    the decrypted ones on these images, and the count computed for generic images.

    Which images are known matters, for a repeated q = 8 key on digits, where "1 image is needed": test image 0's
    rows span 6 of the 8 directions and decrypt none of the next eight exactly (about 21 dB); training image 0's
    span 7 and decrypt seven of its next eight exactly, the mean in dB (about 120) hiding the eighth (31 dB). So the
    decrypted images are spanned by the known ones, and the row says which images, how many it took and their rank."""
    family, q = key.family, key.block_size
    needed = known_images_needed(family, q, key.image_shape, key.padding)
    result = {
        "known_images_needed": needed, "kpa_known_images": None, "kpa_rank": None,
        "kpa_full_rank": full_rank(family, q, key.image_shape, key.padding), "kpa_psnr_db": None, "kpa_ssim": None,
        "kpa_images": None,
    }  # fmt: skip
    if not enabled:
        return result
    total = len(normalized)
    if needed + test_images > total:
        return result | {"kpa_note": f"not demonstrated: needs {needed + test_images} sample images, {total} given"}
    plain = to_domain(normalized, key.padding)
    candidates, decrypted = plain[: total - test_images], plain[total - test_images :]
    used = known_images_spanning(candidates, decrypted, family=family, block_size=q, start=needed)
    note = None
    if used is None:
        note = (f"the first {len(candidates)} sample images never span the decrypted ones (rank "
                f"{plaintext_rank(candidates, family=family, block_size=q)} of {result['kpa_full_rank']}); "
                f"demonstrated with {needed}")
        used = needed
    curve = {point["known_images"]: point for point in attack_curve(
        key, normalized, mean=mean, std=std, known_counts=sorted({needed, used}), test_images=test_images)}
    point = curve[used]
    result |= {
        "kpa_known_images": used, "kpa_rank": point["rank"], "kpa_needed_rank": curve[needed]["rank"],
        "kpa_psnr_db": point["psnr_db"], "kpa_ssim": point["ssim"], "kpa_matrix_error": point["matrix_error"],
        "kpa_needed_psnr_db": curve[needed]["psnr_db"],
        "kpa_images": f"known {sample_images} {_index_range(0, used)}, decrypted {sample_images} "
                      f"{_index_range(total - test_images, total)}",
    }  # fmt: skip
    return result if note is None else result | {"kpa_note": note}


def _index_range(start: int, stop: int) -> str:
    return str(start) if stop - start == 1 else f"{start}-{stop - 1}"


def _demonstration_notes(rows: Sequence[dict]) -> list[str]:
    """Which images the known-plaintext demonstration used: one line when every holder's were the same."""
    used = [(row["holder"], row["kpa_images"]) for row in rows if row.get("kpa_images")]
    notes = [f"holder {row['holder']}: {row['kpa_note']}" for row in rows if row.get("kpa_note")]
    if not used:
        return notes
    lead = "known plaintext demonstrated with "
    tail = " (KPA known: the pairs it took to span the decrypted images, and their rank; known imgs: for generic images)"
    if len({text for _, text in used}) == 1:
        return [lead + used[0][1] + tail, *notes]
    return [lead + "; ".join(f"holder {holder}: {text}" for holder, text in used) + tail, *notes]


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
