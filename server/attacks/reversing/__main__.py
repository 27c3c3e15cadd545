"""``python -m server.attacks.reversing``: recover one holder's channel order and M^-1 from C and its AugConv."""

from __future__ import annotations

import argparse
import sys

import torch

from server.attacks.common import write_json
from server.attacks.reversing import evaluate_reversing
from simulation.cli import attack_parser, output_folder, positive_int, run_command, setup_from_arguments


def _parser() -> argparse.ArgumentParser:
    parser = attack_parser(
        "reversing",
        "Reversing attack: recover a holder's channel order and M^-1 from the first convolution and the holder's "
        "AugConv, then decrypt the holder's morphed images. Needs C of full row rank (beta*n^2 > N).",
        holder_help="which holder to attack",
    )
    parser.add_argument("--test-images", type=positive_int, default=32, help="morphed images decrypted and scored (default 32)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.out = output_folder(args.out, "reversing", ("reversing.json",))
    setup = setup_from_arguments(args, holders=args.holder + 1)
    key = setup.keys[args.holder]
    order = None if setup.orders is None else setup.orders[args.holder]
    images = torch.from_numpy(setup.dataset.test.images[: args.test_images])
    report = evaluate_reversing(setup.first_conv, key, order, images, mean=setup.dataset.mean, std=setup.dataset.std, seed=args.seed)
    for name, value in report.items():
        print(f"{name}: {value}")
    path = write_json(args.out / "reversing.json", {"attack": "reversing", **setup.describe(), "holder": args.holder, "key": key.summary(), **report})
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
