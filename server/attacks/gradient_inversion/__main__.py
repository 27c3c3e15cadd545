"""``python -m server.attacks.gradient_inversion``: the curious server inverts one holder's round-1 update."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from server.attacks.common import (
    normalized_images,
    public_mean_image,
    rate_text,
    to_pixels,
    with_public_brightness,
    write_json,
)
from server.attacks.gradient_inversion import (
    LocalTraining,
    holder_batch_order,
    holder_round,
    invert,
    plot_reconstructions,
    score,
    server_view,
)
from server.plan import shared_backbone_names
from simulation.cli import attack_parser, non_negative_int, output_folder, positive_int, run_command, setup_from_arguments
from simulation.config import UPDATE_DP_MODES, ExperimentConfig
from simulation.errors import UsageError
from simulation.protocol import VARIANTS

RESULTS = ("gradient_inversion.json", "gradient_inversion.png")
DEFAULTS = ExperimentConfig()


def _parser() -> argparse.ArgumentParser:
    parser = attack_parser(
        "gradient_inversion",
        "Gradient inversion as the curious server (Inverting Gradients: cosine objective, total-variation prior, Adam, "
        "restarts), on one holder's round-1 reply: its shared backbone entries after local training on "
        "--batch-size x --local-steps images. The server works in the plain channel order (read from the align reply "
        "under --shuffle federation; irrelevant to the shared entries under --shuffle holder). Labels are given to "
        "the attack (an upper bound on the attacker).",
        holder_help="which holder's key and channel order",
    )
    group = parser.add_argument_group("the round the holder runs (as simulation.run)")
    group.add_argument("--variant", choices=VARIANTS, default="mple", help="mple (morphed images, AugConv) or baseline "
                       "(plain federated learning with the same frozen first layer) (default mple)")
    group.add_argument("--batch-size", type=positive_int, default=1, help="images per local step (default 1)")
    group.add_argument("--local-steps", type=positive_int, default=1, help="local SGD steps: the holder has "
                       "batch-size x local-steps images and trains one epoch over them (default 1)")
    group.add_argument("--local-layers", default="", metavar="PREFIX[,PREFIX]", help="backbone layers that never leave "
                       "the holder, as simulation.run --local-layers")
    group.add_argument("--dp", choices=UPDATE_DP_MODES, default=None, help="differential privacy as simulation.run --dp: the "
                       "server view is the clipped update (the noise is added to the aggregate); a second inversion "
                       "attacks the released view, clipped plus the noise of one holder's aggregate")
    group.add_argument("--dp-noise", type=float, default=DEFAULTS.dp_noise, help=f"noise multiplier (default {DEFAULTS.dp_noise:g})")
    group.add_argument("--dp-clip", type=float, default=DEFAULTS.dp_clip, help=f"clipping norm (default {DEFAULTS.dp_clip:g})")
    group.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"the holder's SGD learning rate (default {DEFAULTS.lr:g})")
    group.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help=f"SGD momentum (default {DEFAULTS.momentum:g})")
    group.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help=f"SGD weight decay (default {DEFAULTS.weight_decay:g})")
    group = parser.add_argument_group("the attack")
    group.add_argument("--restarts", type=positive_int, default=2, help="random restarts; the best objective is kept (default 2)")
    group.add_argument("--iterations", type=positive_int, default=1000, help="Adam iterations per restart (default 1000)")
    group.add_argument("--tv-weight", type=float, default=0.3, help="total-variation prior's weight (default 0.3)")
    group.add_argument("--public-images", type=non_negative_int, default=500, help="public images (the last of the test "
                       "split) for the null guess and the brightness and contrast of the reconstructions (default 500)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.out = output_folder(args.out, "gradient_inversion", RESULTS)
    if args.dp is not None and (args.dp_noise < 0 or args.dp_clip <= 0):
        raise UsageError(f"--dp-noise must be at least 0 and --dp-clip positive, got {args.dp_noise:g} and {args.dp_clip:g}")
    setup = setup_from_arguments(args, holders=args.holder + 1)
    dataset, model = setup.dataset, setup.model
    shuffle = "none" if setup.orders is None else setup.shuffle
    local_layers = [prefix.strip() for prefix in args.local_layers.split(",") if prefix.strip()]
    shared = shared_backbone_names(model, ExperimentConfig(shuffle=shuffle, local_layers=local_layers, model=setup.model_name))
    training = LocalTraining(args.batch_size, args.local_steps, args.lr, args.momentum, args.weight_decay)
    count = args.batch_size * args.local_steps
    if count + args.public_images > len(dataset.train.images) + len(dataset.test.images) or count > len(dataset.train.images):
        raise UsageError(f"{count} holder images and {args.public_images} public images do not fit in {dataset.name}; "
                         "lower --batch-size, --local-steps or --public-images")
    pick = np.random.default_rng(args.seed).choice(len(dataset.train.images), size=count, replace=False)
    images = normalized_images(torch.from_numpy(dataset.train.images[pick]), dataset.mean, dataset.std)
    labels = torch.as_tensor(dataset.train.labels[pick], dtype=torch.long).reshape(-1)
    public = normalized_images(torch.from_numpy(dataset.test.images[len(dataset.test.images) - args.public_images:]),
                               dataset.mean, dataset.std)
    key = setup.keys[args.holder] if args.variant == "mple" else None
    order = range(model.first.out_channels) if setup.orders is None else setup.orders[args.holder]
    sent, aligned, reply = holder_round(model, images, labels, training, key=key, order=order, shuffle=shuffle,
                                        shared=shared, seed=args.seed)
    order_check = None
    if shuffle == "holder":  # what the round-1 reply says about the holder's own order: rerun with another order
        other = torch.randperm(model.first.out_channels, generator=torch.Generator().manual_seed(args.seed + 1))
        _, _, other_reply = holder_round(model, images, labels, training, key=key, order=other, shuffle=shuffle,
                                         shared=shared, seed=args.seed)
        order_check = max(float((reply[name] - other_reply[name]).abs().max()) for name in reply)
        print(f"the round-1 reply under another holder order differs by at most {order_check:.2e} (float rounding): "
              "it carries nothing about the holder's order, and the local layers are the initial values the server sent")
    truth = to_pixels(images, dataset.mean, dataset.std)
    public_mean = public_mean_image(public, dataset.mean, dataset.std)
    views = {"server": {"clip": args.dp_clip if args.dp == "client" else None, "noise": 0.0}}
    if args.dp is not None:
        views["released"] = {"clip": args.dp_clip, "noise": args.dp_noise}
    print(f"gradient inversion on {dataset.name}: {args.variant}, shuffle {shuffle}, local layers {local_layers or 'none'}, "
          f"DP {args.dp or 'off'}; {args.local_steps} local step(s) of {args.batch_size} image(s); "
          f"{args.restarts} restarts of {args.iterations} iterations")
    results, shown = {}, None
    for name, settings in views.items():
        view, recovered = server_view(model, sent, aligned, reply, shuffle=shuffle, seed=args.seed, **settings)
        inversion = invert(model, view, labels[holder_batch_order(count, args.seed)], training, image_shape=dataset.image_shape, mean=dataset.mean,
                           std=dataset.std, restarts=args.restarts, iterations=args.iterations, tv_weight=args.tv_weight,
                           seed=args.seed, progress=print)
        reconstruction = to_pixels(with_public_brightness(inversion.reconstruction, public), dataset.mean, dataset.std)
        figures = score(truth, reconstruction, public_mean)
        results[name] = {**settings, **figures, "objective": inversion.objective, "objectives": inversion.objectives,
                         "seconds": inversion.seconds, "observed_parameters": sum(v.numel() for v in view.update.values())}
        if recovered is not None:
            results[name]["order_from_align_reply_exact"] = bool(torch.equal(recovered, torch.as_tensor(order)))
        if shown is None:
            shown = (reconstruction, figures["assignment"])
        print(f"{name} view: SSIM {figures['ssim']:.3f} (null {figures['null_ssim']:.3f})  PSNR {figures['psnr_db']:.2f} dB "
              f"(null {figures['null_psnr_db']:.2f})  corr {figures['correlation']:.3f}  residual corr "
              f"{figures['residual_correlation']:.3f}  re-id {rate_text(figures['reidentification'])} (chance {figures['chance']:.2f})")
    main_view = results["server"]
    summary = {
        "attack": "gradient_inversion", **setup.describe(), "holder": args.holder, "variant": args.variant,
        "shuffle": shuffle, "local_layers": local_layers, "dp": args.dp, "dp_noise": args.dp_noise if args.dp else None,
        "dp_clip": args.dp_clip if args.dp else None, "batch_size": args.batch_size, "local_steps": args.local_steps,
        "training": vars(training), "shared_entries": len(shared), "reply_change_under_another_holder_order": order_check, "labels": "given to the attack, per local step as the holder used them (upper bound)",
        "images": f"holder: {count} train images drawn with --seed {args.seed}; public: the last {args.public_images} test images",
        **{name: main_view[name] for name in ("ssim", "psnr_db", "correlation", "null_ssim", "null_psnr_db", "null_correlation",
                                              "residual_correlation", "reidentification", "chance")},
        "psnr": main_view["psnr_db"], "views": results,
        "attack_settings": {"restarts": args.restarts, "iterations": args.iterations, "tv_weight": args.tv_weight},
    }  # fmt: skip
    json_path = write_json(args.out / "gradient_inversion.json", summary)
    title = (f"gradient inversion of {dataset.name}: {args.variant}, shuffle {shuffle}, DP {args.dp or 'off'}\n"
             f"{args.local_steps} local step(s) of {args.batch_size} image(s); the server's view\nbest-match SSIM "
             f"{main_view['ssim']:.2f} (null guess {main_view['null_ssim']:.2f}), residual correlation "
             f"{main_view['residual_correlation']:.2f}")
    plot_path = plot_reconstructions(truth, shown[0], shown[1], args.out / "gradient_inversion.png", title=title)
    print(f"wrote {json_path} and {plot_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
