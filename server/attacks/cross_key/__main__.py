"""``python -m server.attacks.cross_key``: every holder's AugConv on every holder's morphed test data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from server.attacks.cross_key import cross_key_for_run, cross_key_matrix, train_demo_backbone, write_cross_key
from simulation.cli import add_setup_arguments, output_folder, positive_int, run_command, setup_from_arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server.attacks.cross_key",
        description="Train a small backbone on the holders' morphed data (each through its own AugConv), then measure the accuracy "
        "of every holder's AugConv on every holder's morphed test data.",
    )
    parser.add_argument("--holders", type=int, default=3, help="number of data holders (default 3)")
    add_setup_arguments(parser, run_help="use a finished simulation.run folder (its global backbone and holders) "
                        "instead of training a demonstration backbone")
    parser.add_argument("--epochs", type=positive_int, default=5, help="training epochs of the demonstration backbone (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="output folder for cross_key.json and .png, which must "
                        "not hold them yet (default: a new results/cross_key/<time> folder)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.out = output_folder(args.out, "cross_key", ("cross_key.json", "cross_key.png"))
    if args.run is not None:
        accuracy, context = cross_key_for_run(args.run)
        print(accuracy_table(accuracy, context["majority_class_rate"]))
        json_path, png_path = write_cross_key(accuracy, args.out, chance=context["majority_class_rate"], context=context)
        print(f"wrote {json_path} and {png_path}")
        return 0
    setup = setup_from_arguments(args, holders=args.holders)
    backbone, augconvs, test_sets = train_demo_backbone(
        setup.model_name, setup.dataset, setup.first_conv, setup.keys, setup.orders, epochs=args.epochs, seed=args.seed
    )
    accuracy = cross_key_matrix(backbone, augconvs, test_sets)
    context = setup.describe() | {"epochs": args.epochs, "keys": [key.summary() for key in setup.keys]}
    majority = float(np.bincount(setup.dataset.test.labels).max() / len(setup.dataset.test.labels))
    print(accuracy_table(accuracy, majority))
    json_path, png_path = write_cross_key(accuracy, args.out, chance=majority, context=context)
    print(f"wrote {json_path} and {png_path}")
    return 0


def accuracy_table(accuracy: np.ndarray, chance: float) -> str:
    """Rows: whose AugConv; columns: whose morphed test data; the diagonal is each holder's own accuracy."""
    holders = range(len(accuracy))
    lines = ["accuracy of holder i's AugConv (rows) on holder j's morphed test data (columns); "
             f"diagonal: own data; chance (majority class) {chance:.3f}",
             "AugConv \\ data  " + "  ".join(f"holder {j:>2}" for j in holders)]
    for i in holders:
        lines.append(f"holder {i:>2}        " + "  ".join(
            f"{accuracy[i, j]:>8.3f}{'*' if i == j else ' '}" for j in holders))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
