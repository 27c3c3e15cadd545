"""``python -m server.attacks.known_plaintext``: the known-plaintext attack on one holder's key, as a curve over k."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from server.attacks.common import rate_text, write_json
from server.attacks.known_plaintext import attack_curve, default_known_counts, full_rank, known_images_needed, plot_curve
from simulation.cli import attack_parser, output_folder, parse_counts, positive_int, run_command, setup_from_arguments


def _parser() -> argparse.ArgumentParser:
    parser = attack_parser(
        "known_plaintext",
        "Known-plaintext attack on one holder's key: recover it from k known (image, morphed image) "
        "pairs by least squares, decrypt other images, and plot PSNR/SSIM against k.",
        holder_help="which holder's key to attack",
    )
    parser.add_argument("--known", type=parse_counts, default=None, help="known-image counts, e.g. 1,2,4 (default: powers of two up to twice the number needed)")
    parser.add_argument("--test-images", type=positive_int, default=32, help="images decrypted and scored at each point (default 32)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.out = output_folder(args.out, "known_plaintext", ("known_plaintext.json", "known_plaintext.png"))
    setup = setup_from_arguments(args, holders=args.holder + 1, with_model=False)
    key = setup.keys[args.holder]
    dataset = setup.dataset
    needed = known_images_needed(key.family, key.block_size, key.image_shape, key.padding)
    rank = full_rank(key.family, key.block_size, key.image_shape, key.padding)
    images = np.concatenate([dataset.train.images, dataset.test.images])
    counts = args.known or default_known_counts(needed, len(images) - args.test_images)
    curve = attack_curve(key, torch.from_numpy(images), mean=dataset.mean, std=dataset.std, known_counts=counts, test_images=args.test_images)
    print(f"known plaintext on {dataset.name}, holder {args.holder}: {key.family} key, q = {key.block_size}; decrypting "
          f"the last {args.test_images} images with the matrix recovered from the first k")
    for point in curve:
        print(f"k = {point['known_images']:>5}: rank {point['rank']}/{rank}  PSNR {point['psnr_db']:7.2f} dB  "
              f"SSIM {point['ssim']:.4f}  residual corr {point['residual_correlation']:.3f}  re-id "
              f"{rate_text(point['reidentification'])}  matrix error {point['matrix_error']:.2e}")
    print(f"null guess (the mean of the other images): PSNR {curve[0]['null_psnr_db']:.2f} dB, SSIM {curve[0]['null_ssim']:.4f}; "
          f"re-identification chance {curve[0]['chance']:.3f}")
    if any(point["rank"] < rank for point in curve):
        print(f"(a rank below {rank}: the known images' rows span only part of the key's domain, so the recovered "
              "matrix is wrong outside it (the matrix error), yet images whose rows lie in that span, such as the "
              "digits' blank columns, still decrypt exactly (the PSNR))")
    summary = {
        "attack": "known_plaintext", **setup.describe(), "holder": args.holder, "key": key.summary(),
        "known_images_needed": needed, "full_rank": rank, "test_images": args.test_images,
        "images": f"known: train+test images 0..k-1 (the train split, then the test split); decrypted: the last {args.test_images}",
        "curve": curve,
    }  # fmt: skip
    write_json(args.out / "known_plaintext.json", summary)
    title = f"known plaintext on {dataset.name}: {key.family} key, q = {key.block_size}, {key.entries} entries, padding {key.padding}"
    plot_curve(curve, args.out / "known_plaintext.png", title=title, needed=needed)
    print(f"wrote {args.out / 'known_plaintext.json'} and {args.out / 'known_plaintext.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
