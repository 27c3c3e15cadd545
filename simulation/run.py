"""`python -m simulation.run`: a federated MpLe experiment on Flower's simulation engine (Ray), with its baseline.

Results land in a run folder: config.json, metrics.json (+ metrics.csv), curves.png, keys.json, class_counts.*,
and each holder's own (owner-only) folder under holders/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from simulation.config import DP_MODES, KEY_PADDING_MODES, SHUFFLE_MODES, ExperimentConfig, build_config
from simulation.errors import UsageError
from simulation.files import atomic_write_json

VARIANTS = ("mple", "baseline")
RUN_MARKER = "config.json"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other usage error (its usage block alone is 36 lines)."""

    def error(self, message: str):
        self.exit(UsageError.exit_code, f"error: {message}; see {self.prog} --help\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m simulation.run",
        description="Federated Metamorphosed Learning: each holder morphs its images with its own secret key and "
        "trains the shared backbone through its own augmented convolution. Flags override --config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=None,
    )
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML preset (see configs/); flags override it")
    add("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint (other flags ignored)")
    add("--out", metavar="DIR", help="run folder to create (must not exist or be empty); default runs/<time>-<dataset>")
    group = parser.add_argument_group("federation")
    group.add_argument("--holders", type=int, help="number of data holders (default 10)")
    group.add_argument("--rounds", type=int, help="federated rounds (default 5)")
    group.add_argument("--fraction-train", type=float, help="fraction of holders sampled to train each round (default 1)")
    group.add_argument("--fraction-evaluate", type=float, help="fraction sampled to evaluate each round (default 1)")
    group.add_argument("--min-holders", type=int, help="successful holders needed for a round to count (default 1)")
    group.add_argument("--strategy", help="built-in name (fedavg, fedprox, fedadam, ...), FILE.py:Class or module:Class")
    group.add_argument("--strategy-arg", action="append", metavar="KEY=VALUE", help="strategy option, repeatable")
    group.add_argument("--local-layers", metavar="PREFIX[,PREFIX]", help="backbone layers that never leave a holder")
    group.add_argument("--dp", choices=DP_MODES, help="differential privacy with fixed clipping on backbone updates")
    group.add_argument("--dp-noise", type=float, help="DP noise multiplier (default 0)")
    group.add_argument("--dp-clip", type=float, help="DP clipping norm (default 10)")
    group = parser.add_argument_group("training")
    group.add_argument("--local-epochs", type=int, help="local epochs per round (default 1)")
    group.add_argument("--batch-size", type=int, help="batch size (default 32)")
    group.add_argument("--lr", type=float, help="SGD learning rate (default 0.05)")
    group.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    group.add_argument("--weight-decay", type=float, help="SGD weight decay (default 5e-4)")
    group.add_argument("--seed", type=int, help="seed for keys, data split, initial weights and sampling (default 0)")
    group = parser.add_argument_group("data and model")
    group.add_argument("--dataset", help="digits (embedded), cifar10, cifar100, medmnist:NAME, npz:PATH, folder:PATH")
    group.add_argument("--data-dir", help="where datasets live or are downloaded to")
    group.add_argument("--image-size", type=int, help="resize images to this side")
    group.add_argument("--partition", help="iid or dirichlet:ALPHA (default iid)")
    group.add_argument("--test-fraction", type=float, help="share of each holder's images kept for its test split")
    group.add_argument("--public-fraction", type=float, help="share of training images public to the server")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crop+flip before morphing "
                       "(default on for CIFAR)")
    group.add_argument("--model", help="cnn, vgg16, vgg16_bn or resnet18 (default cnn)")
    group = parser.add_argument_group("keys and first layer")
    group.add_argument("--key-family", help="dense, blocks or repeated (default repeated)")
    group.add_argument("--block-size", type=int, help="q, the key's block size (default: the image width)")
    group.add_argument("--key-entries", help="uniform (in [0,1)) or integer (1..255)")
    group.add_argument("--key-padding", choices=KEY_PADDING_MODES, help="conv: morph the zero-padded image (MoLe)")
    group.add_argument("--shuffle", choices=SHUFFLE_MODES, help="channel order: federation, holder or none")
    group.add_argument("--first-layer", help="pretrain, random or file:PATH (default pretrain)")
    group.add_argument("--pretrain-epochs", type=int, help="phase-0 epochs on the public split (default 3)")
    group.add_argument("--baseline", action="store_true", default=None,
                       help="also run the same experiment without morphing (same seeds, data order, initial weights)")
    group = parser.add_argument_group("resources and testing")
    group.add_argument("--cpus-per-holder", type=float, help="CPUs Ray reserves per holder (default 1)")
    group.add_argument("--gpus-per-holder", type=float, help="GPUs (fractions allowed) per holder (default 0)")
    group.add_argument("--ray-address", help="join an existing Ray cluster (ADDRESS or auto)")
    group.add_argument("--holder-cache", type=int, help="holders kept in memory per worker (default 16)")
    group.add_argument("--fail-holders", metavar="ID[,ID]", help="make these holders fail, to test failure handling")
    group.add_argument("--fail-stage", choices=("train", "evaluate"), help="where injected failures happen")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = {
        name: value
        for name, value in vars(args).items()
        if name not in ("config", "resume", "strategy_arg", "local_layers", "fail_holders")
    }
    if args.strategy_arg:
        from strategies.registry import parse_strategy_args

        overrides["strategy_args"] = parse_strategy_args(args.strategy_arg)
    if args.local_layers is not None:
        overrides["local_layers"] = [item.strip() for item in args.local_layers.split(",") if item.strip()]
    if args.fail_holders is not None:
        overrides["fail_holders"] = _int_list("--fail-holders", args.fail_holders)
    return build_config(overrides, args.config)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated holder ids such as 2,5, got {text!r}") from None


def preflight(config: ExperimentConfig) -> None:
    """Everything that can be checked before a run folder exists: data, partition, model, first-layer file, key
    settings, strategy, layers."""
    from clients.holder import key_padding
    from clients.keys import check_key_geometry
    from server.first_layer import form_first_layer, initial_model
    from server.server_app import make_strategy, shared_backbone_names, unknown_local_layers
    from simulation.federation import federation_for

    if config.gpus_per_holder > 0 and not config.ray_address:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--gpus-per-holder {config.gpus_per_holder} asks for GPUs, but torch sees no CUDA "
                             "device here; drop the flag to run on the CPU, or join a cluster with --ray-address")
    federation = federation_for(config)
    if config.first_layer.startswith("file:"):
        model, _ = form_first_layer(config, federation)  # reads the file now, not inside the run
    else:
        model = initial_model(config, federation)
    # The checks HolderKey.generate makes in every holder, without drawing a key.
    padding = key_padding(config, model.first)
    check_key_geometry(federation.dataset.image_shape, config.key_family, config.block_size, padding)
    missing = unknown_local_layers(model, config)
    if missing:
        raise UsageError(f"--local-layers names {missing}, which the {config.model} backbone does not have; "
                         f"its layers are {sorted({name.rsplit('.', 1)[0] for name in model.backbone.state_dict()})}")
    shared_backbone_names(model, config)
    make_strategy(config)


def prepare_run_dir(config: ExperimentConfig, out: Path | None, *, exist_ok: bool = False) -> Path:
    """Create the run folder; never reuse one that holds results (unless resuming via `exist_ok`)."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = config.dataset.split(":")[-1].replace("/", "_").rsplit(".", 1)[0]
        out = Path("runs") / f"{stamp}-{name}-{config.model}-{config.key_family}"
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not exist_ok:
        raise UsageError(f"run folder {out} already exists and is not empty; choose a new --out or --resume it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create run folder {out}: {error.strerror}; choose another --out") from None
    if not (out / RUN_MARKER).exists():
        atomic_write_json(out / RUN_MARKER, config.to_dict())
    return out


def _quiet_logs() -> None:
    """Flower logs every step at INFO; the run prints its own progress. Keep Flower's warnings, minus the notice
    that run_simulation will be replaced by `flwr run` (both are supported here; see README)."""

    class DropDeprecation(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "DEPRECATED FEATURE" not in record.getMessage()

    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        handler.addFilter(DropDeprecation())
    logger.addFilter(DropDeprecation())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def backend_config(config: ExperimentConfig) -> dict:
    init_args = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    if config.ray_address:
        init_args["address"] = config.ray_address
    return {
        "client_resources": {"num_cpus": config.cpus_per_holder, "num_gpus": config.gpus_per_holder},
        "init_args": init_args,
    }


def run_variant(config: ExperimentConfig, run_dir: Path, variant: str, *, progress=print,
                stop_after_round: int | None = None) -> dict:
    """Run one variant on Flower's simulation engine and return its metrics."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.server_app import ServerSettings, build_server_app

    settings = ServerSettings(config=config, run_dir=run_dir, variant=variant, progress=progress,
                              stop_after_round=stop_after_round)
    _quiet_logs()
    run_simulation(
        server_app=build_server_app(settings),
        client_app=client_app,
        num_supernodes=config.holders,
        backend_config=backend_config(config),
    )
    if settings.error is not None:
        if isinstance(settings.error, (UsageError, SystemExit)):
            raise settings.error
        raise RuntimeError(f"the {variant} run failed: {type(settings.error).__name__}: {settings.error}") from settings.error
    if settings.result is None:
        raise RuntimeError(f"the {variant} run ended without results; see the log above")
    return settings.result


def run_experiment(config: ExperimentConfig, run_dir: Path, *, progress=print, stop_after_round=None) -> dict:
    from simulation.report import write_report, write_setup

    write_setup(config, run_dir)
    results = {}
    for variant in VARIANTS if config.baseline else VARIANTS[:1]:
        finished = run_dir / variant / "metrics.json"
        if finished.exists():
            results[variant] = json.loads(finished.read_text())
            continue
        progress(f"== {variant}: {config.holders} holders, {config.rounds} rounds, {config.dataset}, {config.model}")
        results[variant] = run_variant(config, run_dir, variant, progress=progress, stop_after_round=stop_after_round)
    return write_report(config, run_dir, results, progress=progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.resume:
            run_dir = Path(args.resume).expanduser()
            if not (run_dir / RUN_MARKER).is_file():
                raise UsageError(f"--resume {run_dir}: no {RUN_MARKER} there; give the folder of an earlier run")
            try:
                config = ExperimentConfig.from_json((run_dir / RUN_MARKER).read_text()).validate()
            except (ValueError, TypeError, AttributeError) as error:  # not JSON, or not a run's settings
                raise UsageError(f"--resume {run_dir}: its {RUN_MARKER} is not a run's settings ({error}); give the "
                                 "folder of an earlier run") from None
        else:
            config = config_from_args(args)
            preflight(config)
            run_dir = prepare_run_dir(config, Path(args.out) if args.out else None)
        config = replace(config, out=str(run_dir))
        print(f"run folder: {run_dir}", flush=True)
        summary = run_experiment(config, run_dir, progress=lambda line: print(line, flush=True))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    final = summary["final"]
    line = f"final accuracy {final['accuracy']:.4f}"
    if "baseline_accuracy" in final:
        line += f", baseline {final['baseline_accuracy']:.4f} (difference {final['difference_pp']:+.2f} pp)"
    print(line)
    print(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
