"""``python -m server.attacks.ciphertext_only``: one holder's morphed images plus public images -> its images."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from server.attacks.ciphertext_only import attack, plot_examples
from server.attacks.common import rate_text, write_json
from simulation.cli import attack_parser, output_folder, parse_counts, positive_int, run_command, setup_from_arguments
from simulation.errors import UsageError

RESULTS = ("ciphertext_only.json", "ciphertext_only.png")


def _parser() -> argparse.ArgumentParser:
    parser = attack_parser(
        "ciphertext_only",
        "Ciphertext-only attack on one holder's key, as the party that trains for it: from the holder's morphed "
        "images and public images of the same kind (never a plaintext of that holder), match the block statistics "
        "(second moments, then adjacent-row and cross-channel moments by L-BFGS) to estimate M^-1, and score the "
        "reconstructions against the null guess (the mean public image).",
        holder_help="which holder's key to attack",
    )
    parser.add_argument("--holder-images", type=parse_counts, default=[1000], metavar="N[,N...]", help=(
        "morphed images of the holder the attacker has: the first N of the train split, then the test split; a list "
        "gives a curve (default 1000)"))
    parser.add_argument("--public-images", type=parse_counts, default=[1000], metavar="N[,N...]", help=(
        "public images of the same kind: the last N of the test split, then the train split, disjoint from the "
        "holder's; a list gives a curve (default 1000)"))
    parser.add_argument("--attacked", type=positive_int, default=64, help="holder images reconstructed and scored (default 64)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.out = output_folder(args.out, "ciphertext_only", RESULTS)
    setup = setup_from_arguments(args, holders=args.holder + 1, with_model=False)
    key, dataset = setup.keys[args.holder], setup.dataset
    images = torch.from_numpy(np.concatenate([dataset.train.images, dataset.test.images]))
    most_holder, most_public = max(args.holder_images), max(args.public_images)
    if most_holder + most_public > len(images):
        raise UsageError(f"{most_holder} holder images and {most_public} public images need {most_holder + most_public} "
                         f"disjoint images, {dataset.name} has {len(images)}; lower --holder-images or --public-images")
    if args.attacked > min(args.holder_images):
        raise UsageError(f"--attacked {args.attacked} is more than the fewest holder images ({min(args.holder_images)}); "
                         "lower --attacked or raise --holder-images")
    points = sorted({(h, most_public) for h in args.holder_images} | {(most_holder, p) for p in args.public_images})
    print(f"ciphertext-only on {dataset.name}, holder {args.holder}: {key.family} key, q = {key.block_size}; "
          f"scoring the first {args.attacked} of the holder's images")
    print(f"{'holder imgs':>11} {'public imgs':>11} {'stage':>12} {'corr':>6} {'SSIM':>6} {'PSNR':>6} "
          f"{'null corr':>9} {'null SSIM':>9} {'resid corr':>10} {'re-id':>6} {'chance':>6}")
    curve, last = [], None
    for holder_count, public_count in points:
        last = attack(key, images[:holder_count], images[len(images) - public_count:], mean=dataset.mean,
                      std=dataset.std, attacked=args.attacked, seed=args.seed)
        point = last["result"]
        curve.append(point)
        print(f"{holder_count:>11} {public_count:>11} {point['stage']:>12} {point['correlation']:6.3f} {point['ssim']:6.3f} "
              f"{point['psnr_db']:6.2f} {point['null_correlation']:9.3f} {point['null_ssim']:9.3f} "
              f"{point['residual_correlation']:10.3f} {rate_text(point['reidentification']):>6} {point['chance']:6.3f}")
    identity = last["result"]["stages"]["identity_guess"]
    print(f"identity guess (each morphed image read as the image), at the largest counts: corr {identity['correlation']:.3f}, "
          f"residual corr {identity['residual_correlation']:.3f}, re-id {rate_text(identity['reidentification'])}")
    final = last["result"]
    summary = {
        "attack": "ciphertext_only", **setup.describe(), "holder": args.holder, "key": key.summary(),
        "images": (f"holder: the first N of train+test (morphed with the holder's key); public: the last N of "
                   f"train+test, disjoint; scored: the first {args.attacked} holder images"),
        **{name: final[name] for name in ("correlation", "ssim", "psnr_db", "null_correlation", "null_ssim", "null_psnr_db",
                                          "residual_correlation", "reidentification", "chance", "stage")},
        "psnr": final["psnr_db"], "holder_images": final["holder_images"], "public_images": final["public_images"],
        "identity_guess": identity, "curve": curve,
    }  # fmt: skip
    json_path = write_json(args.out / "ciphertext_only.json", summary)
    title = (f"ciphertext-only on {dataset.name}: {key.family} key, q = {key.block_size}, from {final['holder_images']} morphed "
             f"and {final['public_images']} public images\nresidual correlation {final['residual_correlation']:.2f}, "
             f"re-identified {rate_text(final['reidentification'])} (chance {final['chance']:.3f})")
    plot_path = plot_examples(last["truth"], last["morphed"], last["reconstruction"], args.out / "ciphertext_only.png", title=title)
    print(f"wrote {json_path} and {plot_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
