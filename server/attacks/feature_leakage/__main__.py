"""``python -m server.attacks.feature_leakage``: how much one holder's AugConv output maps resemble the images."""

from __future__ import annotations

import argparse
import sys

import torch

from clients.augconv import AugConv
from clients.morphing import morph
from server.attacks.common import normalized_images, to_pixels, write_json
from server.attacks.feature_leakage import feature_maps, leakage, plot_feature_grid
from simulation.cli import attack_parser, output_folder, positive_int, run_command, setup_from_arguments


def _parser() -> argparse.ArgumentParser:
    parser = attack_parser(
        "feature_leakage",
        "Show a holder's AugConv output maps for morphed images and measure how much they resemble the originals.",
        holder_help="which holder's AugConv",
    )
    parser.add_argument("--samples", type=positive_int, default=16, help="test images measured (default 16); the grid shows the first")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.out = output_folder(args.out, "feature_leakage", ("feature_leakage.json", "feature_leakage.png"))
    setup = setup_from_arguments(args, holders=args.holder + 1)
    dataset, key = setup.dataset, setup.keys[args.holder]
    order = None if setup.orders is None else setup.orders[args.holder]
    augconv = AugConv.from_conv(setup.first_conv, key, order)
    normalized = normalized_images(torch.from_numpy(dataset.test.images[: args.samples]), dataset.mean, dataset.std)
    originals = to_pixels(normalized, dataset.mean, dataset.std)
    maps = feature_maps(augconv, morph(normalized, key), originals.shape[-2:])
    result = leakage(maps, originals)
    summary = {name: value for name, value in result.items() if name not in ("ssim", "correlation")}
    for name, value in summary.items():
        if name != "best_channel":
            print(f"{name}: {value:.4f}")
    write_json(args.out / "feature_leakage.json", {"attack": "feature_leakage", **setup.describe(), "holder": args.holder, "key": key.summary(), "samples": len(originals), **summary, "per_image_channel_ssim": result["ssim"], "per_image_channel_correlation": result["correlation"]})
    title = f"AugConv outputs of holder {args.holder} ({key.family} key) on {dataset.name}, {setup.first_layer_source}"
    plot_feature_grid(originals[0], maps[0], result["ssim"][0], args.out / "feature_leakage.png", title=title)
    print(f"wrote {args.out / 'feature_leakage.json'} and {args.out / 'feature_leakage.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
