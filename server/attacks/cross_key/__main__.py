"""``python -m server.attacks.cross_key``: every holder's AugConv on every holder's morphed test data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from server.attacks.cross_key import cross_key_for_run, cross_key_matrix, train_demo_backbone, write_cross_key
from simulation.cli import add_setup_arguments, positive_int, run_command, setup_from_arguments


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
    parser.add_argument("--out", type=Path, default=Path("results/attacks/cross_key"), help="output folder for cross_key.json and .png")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.run is not None:
        accuracy, context = cross_key_for_run(args.run)
        with np.printoptions(precision=3, suppress=True):
            print(accuracy)
        json_path, png_path = write_cross_key(accuracy, args.out, chance=context["majority_class_rate"], context=context)
        print(f"wrote {json_path} and {png_path}")
        return 0
    setup = setup_from_arguments(args, holders=args.holders)
    backbone, augconvs, test_sets = train_demo_backbone(
        setup.model_name, setup.dataset, setup.first_conv, setup.keys, setup.orders, epochs=args.epochs, seed=args.seed
    )
    accuracy = cross_key_matrix(backbone, augconvs, test_sets)
    with np.printoptions(precision=3, suppress=True):
        print(accuracy)
    context = setup.describe() | {"epochs": args.epochs, "keys": [key.summary() for key in setup.keys]}
    majority = float(np.bincount(setup.dataset.test.labels).max() / len(setup.dataset.test.labels))
    json_path, png_path = write_cross_key(accuracy, args.out, chance=majority, context=context)
    print(f"wrote {json_path} and {png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
