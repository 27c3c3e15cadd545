"""Compare the data holders' keys: ``python -m simulation.keys compare``.

The command: one row of public figures per holder (see :mod:`simulation.key_table`, where the comparison lives, and
docs/privacy.md), printed as a table and written to keys.json and morph.png. Keys come from holder-side material
only (:mod:`simulation.cli`): ``--holder-seed N`` repeats them, ``--run RUN_DIR`` reads a finished run's own keys,
and without either they are fresh.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from simulation.cli import add_setup_arguments, output_folder, positive_int, run_command, setup_from_arguments
from simulation.errors import UsageError
from simulation.key_table import (
    TIMING_MAX_REPEATS_PER_MIN,
    TIMING_SECONDS,
    TIMING_TARGET_SPREAD,
    TimingPlan,
    compare_keys,
    format_key_table,
    write_key_report,
)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulation.keys", description="Inspect the data holders' morphing keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare",
        help="compare the holders' keys: cost, key space, known-plaintext break point, how different morphed images look",
        description="One row per holder: fingerprint, family, q, entries, worst condition number, AugConv memory and time against "
        "the plain first convolution (timed once per key geometry, until the figures settle), brute-force key space (log10, "
        "and the chance that a blind guess of the channel order is right), known images that break the key (computed and demonstrated), "
        "SSIM/PSNR between original and morphed images. Writes keys.json, morph.png and keys.png (cost against attacks, per holder) to --out.",
    )
    compare.add_argument("--holders", type=int, default=None, help="number of data holders (default 3; with --run, all the run's holders)")
    add_setup_arguments(compare)
    compare.add_argument("--samples", type=positive_int, default=16, help="images for the SSIM/PSNR columns (default 16)")
    compare.add_argument("--timing-batch", type=positive_int, default=64, help="batch size of the timing (default 64)")
    compare.add_argument("--timing-repeats", type=positive_int, default=10, help="fewest interleaved timing repeats per key "
                         f"geometry; more follow until the aug/plain ratio's interquartile range is within "
                         f"{100 * TIMING_TARGET_SPREAD:g}%% of its median, and the medians are reported (default 10)")
    compare.add_argument("--timing-max-repeats", type=positive_int, default=None, help="most timing repeats per key geometry "
                         f"(default {TIMING_MAX_REPEATS_PER_MIN} x --timing-repeats)")
    compare.add_argument("--timing-seconds", type=positive_seconds, default=TIMING_SECONDS, help="time cap per key geometry; "
                         f"a figure whose spread is still large then is marked noisy (default {TIMING_SECONDS:g})")
    compare.add_argument("--no-known-plaintext", action="store_true", help="skip the known-plaintext demonstration")
    compare.add_argument("--out", type=Path, default=None, help="output folder for keys.json, morph.png and keys.png, which must "
                         "not hold them yet (default: a new results/keys/<time> folder)")
    return parser


SUBCOMMANDS = ("compare",)


def _main(argv: list[str] | None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if not given or (given[0] not in SUBCOMMANDS and given[0] not in ("-h", "--help")):
        raise UsageError(f"python -m simulation.keys needs a subcommand first: {', '.join(SUBCOMMANDS)} (for example "
                         f"python -m simulation.keys compare {' '.join(given) or '--holders 3'})")
    args = _parser().parse_args(argv)
    # A bad timing plan is refused before the set-up draws keys and loads data.
    TimingPlan.checked(args.timing_repeats, args.timing_max_repeats, args.timing_seconds, TIMING_TARGET_SPREAD)
    args.out = output_folder(args.out, "keys", ("keys.json", "morph.png", "keys.png"))
    setup = setup_from_arguments(args, holders=args.holders)
    dataset = setup.dataset
    images = torch.from_numpy(np.concatenate([dataset.train.images, dataset.test.images]))
    sample_images = "train+test images"  # the train split, then the test split
    rows = compare_keys(
        setup.keys, setup.first_conv, images, mean=dataset.mean, std=dataset.std, order=setup.orders,
        backbone=setup.model.backbone, timing_batch=args.timing_batch, timing_repeats=args.timing_repeats,
        timing_max_repeats=args.timing_max_repeats, timing_seconds=args.timing_seconds,
        metric_images=args.samples, known_plaintext=not args.no_known_plaintext, sample_images=sample_images,
    )  # fmt: skip
    print(format_key_table(rows))
    context = setup.describe() | {"torch_threads": torch.get_num_threads(), "sample_images": f"{sample_images}: {len(images)}"}
    json_path, figure_path, tradeoff_path = write_key_report(rows, args.out, setup.keys, images, mean=dataset.mean,
                                                             std=dataset.std, context=context)
    print(f"wrote {json_path}, {figure_path} and {tradeoff_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
