"""The key comparison: one row of public figures per data holder, as a table, keys.json and morph.png.

Library: ``python -m simulation.keys compare`` and a run's report (simulation.report) call it. One row per holder
(DESIGN.md section 4; the figures are explained in docs/privacy.md):

* the key's public facts: fingerprint, family, block size ``q``, entry distribution, worst block
  condition number;
* cost: AugConv's memory against the plain first convolution's, and the forward time of AugConv on
  a batch of morphed images against the plain convolution on the same images unmorphed, measured
  side by side (interleaved, repeated until the ratio's spread is small), once per key geometry:
  timing depends on the key's shape, never on its values, so holders whose keys share a geometry
  share its figures instead of each getting one noisy draw;
* brute force: log10 of the number of keys, for the channel order (``log10(beta!)``, 0 without a
  secret order, and the chance ``1/beta!`` that one blind guess of it is right) and for the matrix
  (``free entries * log10(values per entry)``: 255 values for integer entries, ``2^23`` for uniform ones, as float32 carries 23 mantissa bits; free entries are ``q^2``
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
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.augconv import AugConv
from clients.keys import HolderKey
from clients.morphing import morph
from server.attacks.common import display_image, normalized_images, to_domain, to_pixels, write_json
from server.attacks import ciphertext_only
from server.attacks.known_plaintext import (
    attack_curve,
    full_rank,
    known_images_needed,
    known_images_spanning,
    plaintext_rank,
)
from server.attacks.reversing import evaluate_reversing
from simulation.errors import UsageError
from simulation.imagemetrics import psnr_per_image, scale_to_reference, ssim_per_image

INTEGER_ENTRY_VALUES = 255
FLOAT32_MANTISSA_BITS = 23
FIGURE_MAX_HOLDERS = 10
ATTACK_IMAGES = 500  # ciphertext-only: morphed and public images, each
ATTACK_MIN_IMAGES = 16
RECOVERED_PSNR_DB = 30  # a reconstruction this close is the image, for keys.png's filled markers
REVERSING_MAX_DOMAIN = 1024  # the reversing attack reads N rows through AugConv: a 3x32x32 domain takes about a minute

# Timing: repeats go on until the interquartile range of each aug/plain ratio is at most this share of its median.
TIMING_TARGET_SPREAD = 0.10
TIMING_SPREAD_MIN_REPEATS = 5  # quartiles of fewer repeats say nothing about the spread
TIMING_MAX_REPEATS_PER_MIN = 10  # default cap on repeats: this many times the minimum
TIMING_SECONDS = 30.0  # default cap on one geometry's timing
# A call shorter than this is run several times back to back per sample: single sub-millisecond calls are mostly
# timer and interpreter noise.
TIMING_MIN_SAMPLE_S = 0.005
TIMING_MAX_RUNS_PER_SAMPLE = 1000
# Below this a probability is no longer a normal float64 (1/171! already is not); it is then written from its log10.
FLOAT_MIN_LOG10 = math.log10(sys.float_info.min)

DEFINITIONS = {
    "worst_condition": "largest 2-norm condition number among the key's blocks",
    "augconv_bytes": "memory of the holder's AugConv buffers; conv_bytes: the plain first convolution's parameters",
    "augconv_ms": f"median forward time of AugConv on a batch of morphed images (ms); conv_ms: the plain convolution on the same images unmorphed, measured interleaved with it (the two alternate, each first in every other repeat; a call shorter than {1000 * TIMING_MIN_SAMPLE_S:g} ms runs several times back to back per repeat, its time divided by the count); morph_ms: morphing the batch; all timings are per timing_geometry, shared by the holders with that geometry",
    "augconv_step_ms": "median time of a training step (morphing, AugConv, backbone forward and backward; the first layer is frozen) on the batch (ms); step_ms: the same step of the plain model on the images unmorphed (None without a backbone)",
    "augconv_ratio": f"median over the repeats of each repeat's AugConv time over its plain convolution time (the table's x); augconv_ratio_spread: the interquartile range of those ratios over their median (0.04 = 4%; None with fewer than {TIMING_SPREAD_MIN_REPEATS} repeats); augconv_step_ratio and augconv_step_ratio_spread likewise for the training step (None without a backbone)",
    "timing_geometry": "what the timings depend on, and which holders share them: the key's family, q, image shape and padding, the first layer's shape and the batch; not the key's values, entry distribution or channel order, which change the numbers computed, not the work",
    "timing_repeats": "interleaved repeats the timings are medians of: at least timing_min_repeats (unless timing_cap_s runs out first), then on until every ratio's spread is at most timing_target_spread, at most timing_max_repeats repeats or timing_cap_s seconds (timing_elapsed_s: the time taken); timing_stopped says what ended them ('settled', 'max repeats' or 'time cap'); a ratio whose spread is then above timing_target_spread is marked noisy in the table",
    "order_keyspace_log10": "log10(beta!) for a secret channel order of beta channels (order_channels), 0 without one (order_channels None)",
    "order_guess_probability": "probability that one blind guess of the channel order is right: 1/beta! (the MpLe paper's 7.9e-90 is 1/64!), 1 without a secret order (there is nothing to guess); a number while a float64 holds it (beta <= 170), beyond that a string in the same notation computed from order_keyspace_log10, e.g. '2.88e-1167' for 512 channels",
    "ciphertext_only_residual_correlation": "the ciphertext-only attack (server.attacks.ciphertext_only) with ciphertext_only_images morphed and as many public images: the residual correlation of its reconstructions (0: nothing beyond the mean image; 1: the images); ciphertext_only_reidentification: the share of reconstructions closest to their own image; run once per attack geometry, on attack_holder's key",
    "reversing_psnr_db": "PSNR of the images the reversing attack (server.attacks.reversing: C and the holder's AugConv) decrypts; above RECOVERED_PSNR_DB = 30 dB it recovers them (None for domains over REVERSING_MAX_DOMAIN = 1024 coordinates: not run, as it reads N rows through AugConv); once per attack geometry",
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


def order_guess_probability(channels: int | None) -> float | str:
    """1/channels!, the chance that one blind guess of a secret order of ``channels`` channels is right; 1 without one.

    A float while a float64 holds it, beyond that (171 channels and more) the string ``reciprocal_text`` writes,
    as ``10.0 ** -log10`` would be 0."""
    log10 = order_keyspace_log10(channels) if channels else 0.0
    return 10.0**-log10 if -log10 >= FLOAT_MIN_LOG10 else reciprocal_text(log10, significant=3)


def reciprocal_text(log10: float, *, significant: int = 2) -> str:
    """``10**-log10`` in scientific notation (``3.8e-36``), mantissa and exponent taken from the logarithm, so that it
    prints for any key space (a float underflows to 0 past about 308 digits)."""
    if log10 == 0:
        return "1"
    exponent = math.floor(-log10)
    mantissa = round(10.0 ** (-log10 - exponent), significant - 1)
    if mantissa >= 10:  # 9.96 rounded up to 10.0
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:.{significant - 1}f}e{exponent}"


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
    timing_max_repeats: int | None = None,
    timing_seconds: float = TIMING_SECONDS,
    timing_target_spread: float = TIMING_TARGET_SPREAD,
    metric_images: int = 16,
    known_plaintext: bool = True,
    known_plaintext_test_images: int = 8,
    sample_images: str = "sample images",
    attack_images=None,
    attacks: bool = True,
) -> list[dict]:
    """One row of public figures per holder (see the module docstring and ``DEFINITIONS``).

    ``images`` are sample images (uint8, or normalised floats) of the dataset; they need not belong
    to the holders (the figures are properties of the keys). ``order`` is ``None``, one channel order
    for all holders, or one per holder. With ``backbone`` (whose input is the first layer's output, in
    the holders' channel order), a training step (morphing, forward and backward) is timed as well,
    against the same step on the plain model. Timings are taken once per ``timing_geometry`` and shared by
    the holders with that geometry: at least ``timing_repeats`` interleaved repeats, then more until each
    aug/plain ratio's interquartile range is at most ``timing_target_spread`` of its median, stopping at
    ``timing_max_repeats`` (default ``TIMING_MAX_REPEATS_PER_MIN`` times ``timing_repeats``) or after
    ``timing_seconds``. The known-plaintext demonstration needs
    ``known_images_needed + known_plaintext_test_images`` images and is left out (``None``) otherwise:
    it decrypts the last ``known_plaintext_test_images`` images with a matrix recovered from the fewest
    first images that span them (``kpa_known_images``), and from ``known_images_needed``; ``sample_images``
    names the images in the rows' ``kpa_images`` (e.g. "test split images" for a run's first 64).
    With ``attacks``, the ciphertext-only attack (the first half of ``attack_images``, default ``images``, as the
    holder's morphed images, the second half as public ones, up to ``ATTACK_IMAGES`` each) and the reversing attack
    (``C`` and the holder's AugConv) run once per attack geometry, on its first holder's key (``attack_holder``).
    """
    if not keys:
        raise UsageError("no keys to compare; give at least one holder key")
    plan = TimingPlan.checked(timing_repeats, timing_max_repeats, timing_seconds, timing_target_spread)
    normalized = normalized_images(images, mean, std)
    orders = _orders_per_holder(order, len(keys), first_conv.out_channels)
    timing_images = normalized[torch.arange(timing_batch) % len(normalized)]
    shown = normalized[:metric_images]
    conv_bytes = sum(p.numel() * p.element_size() for p in first_conv.parameters())
    timings: dict[str, dict] = {}  # per timing geometry
    attacked: dict[tuple, dict] = {}  # per attack geometry: what the attacks depend on, the batch aside
    attack_pool = None if not attacks else normalized if attack_images is None else normalized_images(attack_images, mean, std)
    rows = []
    for index, (key, holder_order) in enumerate(zip(keys, orders)):
        augconv = AugConv.from_conv(first_conv, key, holder_order)
        geometry = timing_geometry(key, first_conv, len(timing_images))
        if geometry not in timings:
            timings[geometry] = _time_side_by_side(first_conv, augconv, key, timing_images, backbone, plan)
        attack_geometry = (key.family, key.block_size, tuple(key.image_shape), key.padding, tuple(first_conv.weight.shape))
        if attacks and attack_geometry not in attacked:
            attacked[attack_geometry] = {"attack_holder": index, **_attack_figures(key, first_conv, holder_order, attack_pool, mean, std)}
        order_channels = None if holder_order is None else first_conv.out_channels
        row = {
            "holder": index,
            **{field: value for field, value in key.summary().items() if field not in ("image_shape", "domain_shape")},
            "num_blocks": key.num_blocks,
            "expected_float32_error": key.expected_float32_error(),
            "augconv_bytes": augconv.memory_bytes,
            "conv_bytes": conv_bytes,
            **timings[geometry],
            "timing_geometry": geometry,
            "order_channels": order_channels,
            "order_keyspace_log10": order_keyspace_log10(order_channels) if order_channels else 0.0,
            "order_guess_probability": order_guess_probability(order_channels),
            "matrix_keyspace_log10": matrix_keyspace_log10(key),
            **_known_plaintext_demo(key, normalized, mean, std, known_plaintext, known_plaintext_test_images, sample_images),
            **_morph_similarity(key, shown, mean, std),
            **attacked.get(attack_geometry, {}),
        }
        rows.append(row)
        del augconv
    return rows


def plot_tradeoff(rows: Sequence[dict], path: Path) -> Path:
    """keys.png: per holder, what its key costs against what breaks it, so the trade-off shows at a glance.

    Left: the training step's time over the plain model's (x) against the known (image, morphed image) pairs that
    determine the key (y, log). Right: AugConv's memory (x, log) against the ciphertext-only attack's residual
    correlation (y: 0 is nothing learnt beyond the mean image, 1 the images themselves). A filled marker: the
    reversing attack (``C`` and the holder's AugConv) recovers the images; hollow: it does not.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2), layout="constrained")
    cost_axes, memory_axes = figure.subplots(1, 2)
    families = sorted({row["family"] for row in rows})
    colours = {family: colour for family, colour in zip(families, ("tab:blue", "tab:orange", "tab:green"))}
    points: dict[tuple, list[int]] = {}  # holders whose keys share a geometry share their figures: one marker, all labels
    for row in rows:
        reversing = row.get("reversing_psnr_db")
        reversed_ = None if reversing is None else reversing > RECOVERED_PSNR_DB
        step = row.get("augconv_step_ratio")  # None without a backbone: the cost panel then has no point for it
        memory = row["augconv_bytes"] / 2**20
        place = (row["family"], reversed_, step, row["known_images_needed"], memory, row.get("ciphertext_only_residual_correlation"))
        points.setdefault(place, []).append(row["holder"])
    for (family, reversed_, step, known, memory, co), holders in points.items():
        colour = colours[family]
        style = {"color": colour, "markerfacecolor": colour if reversed_ else "none", "marker": "o" if reversed_ is not None else "s",
                 "markersize": 8, "linestyle": "none"}
        label = _holder_list(holders)
        if step is not None:
            cost_axes.plot([step], [known], **style)
            cost_axes.annotate(label, (step, known), textcoords="offset points", xytext=(5, 3), fontsize=7)
        if co is not None:
            memory_axes.plot([memory], [co], **style)
            memory_axes.annotate(label, (memory, co), textcoords="offset points", xytext=(5, 3), fontsize=7)
    for family, colour in colours.items():
        q = sorted({row["block_size"] for row in rows if row["family"] == family})
        memory_axes.plot([], [], "o", color=colour, label=f"{family}, q = {', '.join(map(str, q))}")
    memory_axes.plot([], [], "o", color="grey", label="filled: reversing recovers the images")
    memory_axes.plot([], [], "o", color="grey", markerfacecolor="none", label="hollow: reversing fails")
    if any(row.get("reversing_psnr_db") is None for row in rows):
        memory_axes.plot([], [], "s", color="grey", markerfacecolor="none",
                         label=f"square: reversing not run (domain over {REVERSING_MAX_DOMAIN})")
    cost_axes.set_yscale("log")
    cost_axes.set_xlabel("training step time, AugConv model / plain model (x)")
    cost_axes.set_ylabel("known image pairs that determine the key (log)")
    cost_axes.set_title("cost against known-plaintext strength", fontsize=9)
    memory_axes.set_xscale("log")
    memory_axes.set_ylim(-0.1, 1.05)
    memory_axes.axhline(0, color="grey", linewidth=0.8)
    memory_axes.set_xlabel("AugConv memory (MiB, log)")
    memory_axes.set_ylabel("ciphertext-only residual correlation")
    memory_axes.set_title("memory against ciphertext-only leakage (higher: more leaks)", fontsize=9)
    memory_axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)  # below: points reach 1
    for axes in (cost_axes, memory_axes):
        axes.grid(alpha=0.3)
    figure.suptitle("keys: what each holder's key costs, and what breaks it (one marker per key geometry, labelled with its holders)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def timing_geometry(key: HolderKey, conv: nn.Conv2d, batch: int) -> str:
    """What the time of a holder's morphing, AugConv and training step depends on: the shapes of the key, the first
    layer and the batch. Not the key's values, entry distribution or channel order: those change the numbers AugConv
    computes, not the work."""
    channels, height, width = key.image_shape
    kernel = "x".join(map(str, conv.kernel_size))
    return (f"{key.family} q={key.block_size} on {channels}x{height}x{width}, key padding {key.padding}; first layer "
            f"{conv.in_channels}->{conv.out_channels} {kernel} padding {_conv_padding_text(conv)}, batch {batch}")


def format_key_table(rows: Sequence[dict]) -> str:
    """The comparison as a terminal table, with lines saying how the timings were taken and which images the
    known-plaintext demonstration used.

    ``x`` is the median of the per-repeat aug/plain time ratios, ``IQR`` their interquartile range over that median
    (``noisy`` when it stayed above the target); ``order guess P`` is ``1/beta!``; ``known imgs`` is the count for
    generic images; ``KPA known`` the count the demonstration needed on its images, with the rank their equations
    reached, and ``KPA PSNR`` what that many decrypt.
    """
    header = (
        "holder", "fingerprint", "family", "q", "entries", "worst cond", "AugConv MiB", "x conv mem",
        "layer ms aug/plain", "step ms aug/plain", "log10 order", "order guess P", "log10 M", "known imgs", "KPA known",
        "KPA PSNR", "morph SSIM", "morph PSNR",
    )  # fmt: skip
    lines = []
    for row in rows:
        kpa, used = row.get("kpa_psnr_db"), row.get("kpa_known_images")
        lines.append((
            str(row["holder"]), row["fingerprint"], row["family"], str(row["block_size"]), row["entries"],
            f"{row['worst_condition']:.3g}", f"{row['augconv_bytes'] / 2**20:.2f}", f"{row['augconv_bytes'] / row['conv_bytes']:.0f}",
            _timing_cell(row, "augconv_ms", "conv_ms", "augconv_ratio"),
            _timing_cell(row, "augconv_step_ms", "step_ms", "augconv_step_ratio"),
            f"{row['order_keyspace_log10']:.1f}", _guess_cell(row), f"{row['matrix_keyspace_log10']:.4g}",
            str(row["known_images_needed"]), "-" if used is None else f"{used} (rank {row['kpa_rank']}/{row['kpa_full_rank']})",
            "-" if kpa is None else f"{kpa:.1f} dB", f"{row['morph_ssim']:.3f}", f"{row['morph_psnr_db']:.2f} dB",
        ))  # fmt: skip
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]

    def render(cells) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))

    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines), *_timing_notes(rows),
                      *_demonstration_notes(rows)])


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
) -> tuple[Path, Path, Path]:
    """Write ``keys.json`` (rows, context, definitions), ``morph.png`` and ``keys.png`` (:func:`plot_tradeoff`) into
    ``out_dir``.

    ``morph.png`` shows ``figure_samples`` originals and their morphed images (scaled as for the
    SSIM) for the first ``figure_holders`` holders; the title says when holders are left out.
    """
    if [row["fingerprint"] for row in rows] != [key.fingerprint for key in keys]:
        raise UsageError("the rows and keys given to write_key_report do not match; pass the keys the rows were computed from")
    out_dir = Path(out_dir)
    json_path = write_json(out_dir / "keys.json", {"context": context or {}, "definitions": DEFINITIONS, "holders": list(rows)})
    figure_path = _plot_morphs(keys, normalized_images(images[:figure_samples], mean, std), mean, std, out_dir / "morph.png", figure_holders)
    return json_path, figure_path, plot_tradeoff(rows, out_dir / "keys.png")


# ------------------------------------------------------------------------------------------ internals
def _attack_figures(key: HolderKey, conv: nn.Conv2d, order, pool: torch.Tensor, mean, std) -> dict:
    """The ciphertext-only and reversing attacks on one key (their figures depend on its geometry, not its values)."""
    half = min(len(pool) // 2, ATTACK_IMAGES)
    figures = {"ciphertext_only_images": half, "ciphertext_only_residual_correlation": None,
               "ciphertext_only_reidentification": None, "reversing_psnr_db": None}
    if half >= ATTACK_MIN_IMAGES:
        result = ciphertext_only.attack(key, pool[:half], pool[len(pool) - half:], mean=mean, std=std,
                                        attacked=min(half, 32))["result"]
        figures["ciphertext_only_residual_correlation"] = result["residual_correlation"]
        figures["ciphertext_only_reidentification"] = result["reidentification"]
    if key.size <= REVERSING_MAX_DOMAIN:
        report = evaluate_reversing(conv, key, order, pool[:8], mean=mean, std=std,
                                    public_images=pool[len(pool) - half:] if half else None)
        figures["reversing_psnr_db"] = report["psnr_db"]
    return figures


def _timing_cell(row: dict, augmented_field: str, plain_field: str, ratio_field: str) -> str:
    augmented, plain = row.get(augmented_field), row.get(plain_field)
    if augmented is None:
        return "-"
    spread = row.get(f"{ratio_field}_spread")
    cell = f"{augmented:.3g}/{plain:.3g} (x{row[ratio_field]:.2f}"  # 3 digits: a digits layer takes 0.3 ms
    if spread is not None:
        cell += f", IQR {spread:.0%}"
    noisy = spread is None or not spread <= row["timing_target_spread"]  # a NaN spread is noisy too
    return cell + (" noisy)" if noisy else ")")


def _guess_cell(row: dict) -> str:
    channels = row.get("order_channels")
    probability = reciprocal_text(row["order_keyspace_log10"])
    return f"1/{channels}! = {probability}" if channels else probability


_STOPPED = {"settled": "settled", "max repeats": "stopped at the most repeats", "time cap": "stopped at the time cap"}


def _timing_notes(rows: Sequence[dict]) -> list[str]:
    """How the timings were taken: one line for the method, one per timing geometry with the holders that share it."""
    if not rows:
        return []
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["timing_geometry"], []).append(row)
    first = rows[0]
    notes = [
        f"timings: once per key geometry, shared by its holders; medians of interleaved repeats (AugConv and the plain "
        f"layer alternating), x the median of the per-repeat aug/plain ratios, IQR their interquartile range over that "
        f"median; repeats until every IQR <= {first['timing_target_spread']:.0%} (at least {first['timing_min_repeats']}, "
        f"at most {first['timing_max_repeats']} or {first['timing_cap_s']:g} s), noisy where it stayed above"
    ]
    for geometry, members in groups.items():
        timing = members[0]
        holders = _holder_list([member["holder"] for member in members])
        notes.append(f"  {holders} ({geometry}): {timing['timing_repeats']} repeats in {timing['timing_elapsed_s']:.1f} s, "
                     f"{_STOPPED[timing['timing_stopped']]}")
    return notes


def _holder_list(holders: Sequence[int]) -> str:
    """``holders 0-2, 5`` for [0, 1, 2, 5]."""
    runs: list[list[int]] = []
    for holder in holders:
        if runs and holder == runs[-1][-1] + 1:
            runs[-1].append(holder)
        else:
            runs.append([holder])
    text = ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
    return f"holder{'s' if len(holders) > 1 else ''} {text}"


def _conv_padding_text(conv: nn.Conv2d) -> str:
    padding = conv.padding
    if isinstance(padding, str):
        return padding
    return str(padding[0]) if len(set(padding)) == 1 else "x".join(map(str, padding))


def _orders_per_holder(order, holders: int, channels: int) -> list:
    if order is None:
        return [None] * holders
    order = list(order)
    if order and np.ndim(order[0]) == 0:  # one order (list, array or tensor) for every holder
        return [order] * holders
    if len(order) != holders:
        raise UsageError(f"{len(order)} channel orders for {holders} holders; give one order for all or one per holder")
    return order


@dataclass(frozen=True)
class TimingPlan:
    """How long one geometry is timed: ``min_repeats`` to ``max_repeats`` interleaved repeats, stopping once every
    aug/plain ratio's interquartile range is at most ``target_spread`` of its median, or after ``seconds``."""

    min_repeats: int = 10
    max_repeats: int = 10 * TIMING_MAX_REPEATS_PER_MIN
    seconds: float = TIMING_SECONDS
    target_spread: float = TIMING_TARGET_SPREAD

    @classmethod
    def checked(cls, min_repeats: int, max_repeats: int | None, seconds: float, target_spread: float) -> "TimingPlan":
        max_repeats = TIMING_MAX_REPEATS_PER_MIN * min_repeats if max_repeats is None else max_repeats
        if min_repeats < 1:
            raise UsageError(f"timing repeats must be at least 1, got {min_repeats}")
        if max_repeats < min_repeats:
            raise UsageError(f"timing repeats: the most ({max_repeats}) is below the fewest ({min_repeats}); raise "
                             "--timing-max-repeats or lower --timing-repeats")
        if not seconds > 0 or not target_spread > 0:
            raise UsageError(f"the timing cap ({seconds} s) and target spread ({target_spread}) must be positive")
        return cls(min_repeats, max_repeats, seconds, target_spread)

    def as_row(self) -> dict:
        return {"timing_min_repeats": self.min_repeats, "timing_max_repeats": self.max_repeats,
                "timing_cap_s": self.seconds, "timing_target_spread": self.target_spread}


def relative_spread(values: Sequence[float]) -> float | None:
    """Interquartile range over the median (quartiles interpolated linearly, as numpy's default); None for fewer than
    ``TIMING_SPREAD_MIN_REPEATS`` values."""
    if len(values) < TIMING_SPREAD_MIN_REPEATS:
        return None
    lower, median, upper = statistics.quantiles(values, n=4, method="inclusive")
    return (upper - lower) / median


def interleaved_timings(
    calls: dict[str, Callable[[], object]],
    ratios: dict[str, tuple[str, str]],
    plan: TimingPlan,
    clock: Callable[[], float] = time.perf_counter,
    runs_per_sample: dict[str, int] | None = None,
) -> dict:
    """Time ``calls`` in turn, repeat after repeat (reversed in every other repeat, so that neither of a pair always
    runs first), until ``plan`` says stop. ``ratios`` names ratios of two calls' times (``name: (numerator,
    denominator)``), taken per repeat, so that both sides of each ratio see the same moment of a busy machine.
    A call listed in ``runs_per_sample`` runs that many times back to back in each repeat, its time divided by it.

    Returns each call's median time (ms), each ratio's median and spread (``<name>_spread``, see ``relative_spread``),
    and ``timing_repeats``, ``timing_elapsed_s`` and ``timing_stopped`` ('settled', 'max repeats' or 'time cap')."""
    times: dict[str, list[float]] = {field: [] for field in calls}
    runs = {field: 1 for field in calls} | (runs_per_sample or {})
    sequence = list(calls.items())
    started = clock()
    repeats = 0
    while True:
        for field, call in sequence if repeats % 2 == 0 else reversed(sequence):
            start = clock()
            for _ in range(runs[field]):
                call()
            times[field].append(1000 * (clock() - start) / runs[field])
        repeats += 1
        per_repeat = {name: [a / b if b > 0 else math.inf for a, b in zip(times[top], times[bottom])]
                      for name, (top, bottom) in ratios.items()}
        spreads = {name: relative_spread(values) for name, values in per_repeat.items()}
        elapsed = clock() - started
        if repeats >= plan.min_repeats and all(s is not None and s <= plan.target_spread for s in spreads.values()):
            stopped = "settled"
        elif repeats >= plan.max_repeats:
            stopped = "max repeats"
        elif elapsed >= plan.seconds:
            stopped = "time cap"
        else:
            continue
        break
    result = {field: statistics.median(values) for field, values in times.items()}
    for name, values in per_repeat.items():
        result |= {name: statistics.median(values), f"{name}_spread": spreads[name]}
    return result | {"timing_repeats": repeats, "timing_elapsed_s": elapsed, "timing_stopped": stopped}


def _time_side_by_side(conv: nn.Conv2d, augconv: AugConv, key: HolderKey, images: torch.Tensor,
                       backbone: nn.Module | None, plan: TimingPlan) -> dict:
    """Median times (ms) of one timing geometry, measured interleaved: plain conv on the images, AugConv on the morphed
    images, morphing them, and with a backbone a training step (forward and backward) of each model, morphing
    included; with the aug/plain ratios and their spread (``interleaved_timings``)."""
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
        "augconv_ms": lambda: forward_only(augconv, morphed),
        "morph_ms": lambda: forward_only(lambda x: morph(x, key), images),
    }
    ratios = {"augconv_ratio": ("augconv_ms", "conv_ms")}
    if backbone is not None:
        calls["step_ms"] = lambda: step(conv, lambda: images)
        calls["augconv_step_ms"] = lambda: step(augconv, lambda: morph(images, key))
        ratios["augconv_step_ratio"] = ("augconv_step_ms", "step_ms")
    for call in calls.values():  # warm-up: first calls allocate and fill caches
        call()
    runs_per_sample = {field: _runs_per_sample(call) for field, call in calls.items()}
    measured = interleaved_timings(calls, ratios, plan, runs_per_sample=runs_per_sample)
    if backbone is not None:
        backbone.zero_grad(set_to_none=True)
    without_backbone = {"step_ms": None, "augconv_step_ms": None, "augconv_step_ratio": None, "augconv_step_ratio_spread": None}
    return without_backbone | measured | {"timing_batch": len(images)} | plan.as_row()


def _runs_per_sample(call: Callable[[], object]) -> int:
    """How many back-to-back runs of ``call`` last ``TIMING_MIN_SAMPLE_S``, from one more warm-up run."""
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    if once <= 0:
        return TIMING_MAX_RUNS_PER_SAMPLE
    return min(TIMING_MAX_RUNS_PER_SAMPLE, max(1, math.ceil(TIMING_MIN_SAMPLE_S / once)))


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
