"""What the command-line tools share: an experiment's flags (``simulation.run``, ``simulation.deploy``), the set-up of
the key and attack commands (dataset, first layer, holders' keys) and argument helpers.

Only command modules import this (``simulation.run``, ``simulation.deploy``, ``simulation.keys``,
``server.attacks.*.__main__``); library code never does, so the commands stay the top floor.

Holders' keys and channel orders come only from holder-side material, never from ``--seed`` (the experiment seed,
which the server knows: a key drawn from it is a key the server can recompute):

* ``--holder-seed N``: holder ``i``'s secrets are ``HolderSecrets.from_holder_seed(N, i)``, as ``simulation.run
  --holder-seed N`` draws them, so the same N gives the same keys;
* ``--run RUN_DIR``: a finished run's own keys and secrets, read from its holders' folders, with its dataset, model,
  key settings, channel-order mode and first layer;
* neither: fresh secrets from the operating system's entropy (one federation secret shared by the holders); the keys
  cannot be drawn again, and the command says so.

``--seed`` seeds the first layer's random initialisation and data sampling only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clients.floor import DEFAULT_MIN_BLOCK_SIZE, SecurityFloor
from clients.holder import KEY_FILE, holder_home, key_padding
from clients.keys import ENTRY_DISTRIBUTIONS, FAMILIES, HolderKey
from clients.secrets import SECRET_BYTES, SECRETS_FILE, SHUFFLE_MODES, HolderSecrets, channel_order, draw_key
from simulation.config import DP_MODES, KEY_PADDING_MODES, ExperimentConfig, build_config
from simulation.data import DATASET_CHOICES, PARTITION_HELP, ImageDataset, load_dataset
from server.first_layer import load_first_layer
from server.plan import RunPlan
from simulation.errors import UsageError
from simulation.files import fresh_folder
from simulation.models import MODEL_NAMES, SplitModel, build_model
from simulation.run_folder import FIRST_LAYER_FILE, RUN_MARKER
from strategies.registry import parse_strategy_args

FRESH_KEYS_NOTE = "keys: fresh from this machine's entropy, not reproducible (pass --holder-seed N to repeat them)"

# Settings a finished run decides; given together with --run they would silently disagree with its keys.
RUN_DECIDES = {"dataset": "--dataset", "image_size": "--image-size", "model": "--model", "first_layer": "--first-layer",
               "key_family": "--key-family", "block_size": "--block-size", "key_entries": "--key-entries",
               "key_padding": "--key-padding", "padding": "--padding", "shuffle": "--shuffle",
               "holder_seed": "--holder-seed"}
DEFAULTS = {"dataset": "digits", "model": "cnn", "key_family": "repeated", "key_entries": "uniform",
            "key_padding": "none", "shuffle": "federation"}


# ------------------------------------------------------------------------------------------ running a command
def run_command(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a command's body; a UsageError becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def output_folder(out: Path | None, command: str, results: Sequence[str]) -> Path:
    """One rule for every command: without --out, a new folder per run (results/COMMAND/TIME); with --out, a folder
    that holds none of the command's results yet. Earlier results are never overwritten."""
    if out is not None:
        return fresh_folder(out, results=tuple(results), create=False)
    base = Path("results") / command / time.strftime("%Y%m%d-%H%M%S")
    candidate, number = base, 2
    while candidate.exists():
        candidate, number = base.with_name(f"{base.name}-{number}"), number + 1
    return candidate


# ------------------------------------------------------------------------------------------ argument types
def parse_counts(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``1,2,4,8``."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return counts


def _int_at_least(minimum: int, expected: str):
    """An argparse type for integers of at least `minimum`; `expected` names them in the error."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


positive_int = _int_at_least(1, "a positive integer")
holder_index = _int_at_least(0, "a holder id (0, 1, ...)")
non_negative_int = _int_at_least(0, "a non-negative integer")


# ------------------------------------------------------------------------------------------ parsers
def attack_parser(name: str, description: str, *, holder_help: str) -> argparse.ArgumentParser:
    """The arguments every single-holder attack command shares: the experiment set-up, which holder, where to
    write (results/attacks/NAME by default)."""
    parser = argparse.ArgumentParser(prog=f"python -m server.attacks.{name}", description=description)
    add_setup_arguments(parser)
    parser.add_argument("--holder", type=holder_index, default=0, help=f"{holder_help} (default 0)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder for {name}.json and its figure, which "
                        f"must not hold them yet (default: a new results/{name}/<time> folder)")
    return parser


def add_setup_arguments(parser: argparse.ArgumentParser, *, run_help: str | None = None) -> None:
    """Options that set up the dataset, first layer and holders' keys (shared by the compare and attack commands).

    Flag names are those of ``simulation.run``; the older ``--entries``, ``--padding`` and ``--channel-order`` still
    work. Defaults are resolved in :func:`setup_from_arguments`, so that a flag given together with ``--run`` is
    noticed. ``run_help`` replaces the help of ``--run`` for a command that gives it its own meaning (cross_key).
    """
    group = parser.add_argument_group("data, first layer and keys")
    group.add_argument("--run", type=Path, default=None, metavar="RUN_DIR", help=run_help or (
        "take everything from a finished simulation.run folder: its dataset, model, key settings, channel-order mode "
        "and first_layer.pt, and the holders' own keys and secrets from their folders"))
    group.add_argument("--holder-seed", type=non_negative_int, default=None, metavar="N", help=(
        "draw holder i's secrets (key and channel order) from this holder-side seed, as simulation.run --holder-seed N "
        "does (default: fresh entropy, not reproducible)"))
    group.add_argument("--dataset", default=None, help=f"{DATASET_CHOICES} (default digits)")
    group.add_argument("--data-dir", type=Path, default=None, help="where datasets are found or downloaded")
    group.add_argument("--download", action="store_true", help="fetch a missing cifar10, cifar100 or medmnist: dataset into --data-dir (default: refuse, naming the file)")
    group.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    group.add_argument("--model", choices=MODEL_NAMES, default=None, help="model whose first convolution is used (default cnn)")
    group.add_argument("--first-layer", type=Path, default=None, help="load the first convolution from this checkpoint (a run's first_layer.pt: a dict whose 'first' is the conv's state dict); default: the model's random initialisation from --seed")
    group.add_argument("--key-family", choices=FAMILIES, default=None, help="key family (default repeated)")
    group.add_argument("--block-size", type=int, default=None, help="block size q (default: the domain width; dense keys use N)")
    group.add_argument("--key-entries", "--entries", dest="key_entries", choices=ENTRY_DISTRIBUTIONS, default=None, help="entry distribution (default uniform)")
    group.add_argument("--key-padding", choices=KEY_PADDING_MODES, default=None, help="conv: morph the image zero-padded by the first convolution's padding, as the MoLe code does (default none)")
    group.add_argument("--padding", type=non_negative_int, default=None, metavar="PIXELS", help="morph the image zero-padded by this many pixels (older form of --key-padding; default 0)")
    group.add_argument("--shuffle", "--channel-order", dest="shuffle", choices=SHUFFLE_MODES, default=None, help="secret channel order: one for the federation, one per holder, or none (default federation)")
    group.add_argument("--seed", type=int, default=0, help="seed of the first layer's random initialisation and of data sampling, never of keys or channel orders (default 0)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 gives steadier timings on a busy machine)")


# ------------------------------------------------------------------------------------------ an experiment's flags
class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other usage error (its usage block alone is 36 lines)."""

    def error(self, message: str):
        self.exit(UsageError.exit_code, f"error: {message}; see {self.prog} --help\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m simulation.run",
        description="Federated Metamorphosed Learning: each holder morphs its images with its own secret key and "
        "trains the shared backbone through its own augmented convolution. Flags override --config.",
        argument_default=None,
    )
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML preset (see configs/); flags override it")
    add("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint (other flags ignored)")
    add("--out", metavar="DIR", help="run folder to create (must not exist or be empty); default "
        "runs/<time>-<dataset>-<model>-<key family>")
    group = parser.add_argument_group("federation")
    group.add_argument("--holders", type=int, help="number of data holders (default 10; under --partition natural, "
                       "the number of sites)")
    group.add_argument("--rounds", type=int, help="federated rounds (default 5)")
    group.add_argument("--fraction-train", type=float, help="fraction of holders sampled to train each round (default 1)")
    group.add_argument("--fraction-evaluate", type=float, help="fraction sampled to evaluate each round (default 1)")
    group.add_argument("--min-holders", type=int, help="successful holders needed for a round to count (default 1)")
    group.add_argument("--strategy", help="built-in name (fedavg, fedprox, fedadam, ...), FILE.py:Class or module:Class")
    group.add_argument("--strategy-arg", action="append", metavar="KEY=VALUE", help="strategy option, repeatable")
    group.add_argument("--local-layers", metavar="PREFIX[,PREFIX]", help="backbone layers that never leave a holder")
    group.add_argument("--dp", choices=DP_MODES, help="differential privacy: server or client, Flower's fixed clipping "
                       "of whole backbone updates (no epsilon); holder, DP-SGD at each holder with Opacus (per-sample "
                       "clipping, Poisson-sampled batches, an RDP accountant: each holder's spent epsilon per round in "
                       "metrics.json, metrics.csv and curves.png). Opacus cannot clip per sample through BatchNorm, "
                       "so under --dp holder every BatchNorm of the model (cnn, vgg16_bn, resnet18) is a GroupNorm, "
                       "on the server and at the holders alike")
    group.add_argument("--dp-noise", type=float, help="DP noise multiplier (default 0; --dp holder needs it above 0 "
                       "or --dp-epsilon)")
    group.add_argument("--dp-clip", type=float, help="DP clipping norm: of each update (server, client; default 10) or "
                       "of each example's gradient (holder; default 1)")
    group.add_argument("--dp-epsilon", type=float, help="--dp holder: the epsilon each holder may spend over the whole "
                       "run; each calibrates its noise multiplier to it for --rounds x --local-epochs of its steps, "
                       "assuming it is sampled every round (instead of --dp-noise)")
    group.add_argument("--dp-delta", type=float, help="--dp holder: the delta of (epsilon, delta)-DP, below 1 / the "
                       "largest holder's training images (default 1e-5)")
    group = parser.add_argument_group("training")
    group.add_argument("--local-epochs", type=int, help="local epochs per round (default 1)")
    group.add_argument("--batch-size", type=int, help="batch size (default 32)")
    group.add_argument("--lr", type=float, help="SGD learning rate (default 0.05)")
    group.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    group.add_argument("--weight-decay", type=float, help="SGD weight decay (default 5e-4)")
    group.add_argument("--seed", type=int, help="experiment seed: data split, initial weights, pretraining and "
                       "sampling, all public (default 0); never the holders' keys")
    group = parser.add_argument_group("data and model")
    group.add_argument("--dataset", help=f"{DATASET_CHOICES} (default digits)")
    group.add_argument("--data-dir", help="where datasets live or are downloaded to")
    group.add_argument("--download", action="store_true", help="fetch a missing cifar10, cifar100 or medmnist: dataset into --data-dir (default: refuse, naming the file)")
    group.add_argument("--image-size", type=int, help="resize images to this side")
    group.add_argument("--partition", metavar="NAME[:ARG,...]", help="how the training images are shared among the "
                       f"holders, by Flower Datasets' partitioners (default iid): {PARTITION_HELP}")
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
    group = parser.add_argument_group("the holders' side (handed to the holders only, never to the server)")
    group.add_argument("--holder-seed", type=int, metavar="N", help="holder-side secret for reproducible keys, "
                       "channel orders and local randomness (default: fresh entropy, so every run gets new keys); "
                       "a password: use a large random number where the keys must resist a search")
    group.add_argument("--holder-key-families", metavar="FAMILY[,FAMILY]", help="the key families the holders "
                       "accept (default all: dense, blocks, repeated)")
    group.add_argument("--holder-min-block-size", type=int, metavar="Q", help="the smallest block size q the "
                       f"holders accept (default {DEFAULT_MIN_BLOCK_SIZE}; q = 1 multiplies an image by a constant)")
    group = parser.add_argument_group("resources and testing")
    group.add_argument("--cpus-per-holder", type=float, help="CPUs Ray reserves per holder (default 1)")
    group.add_argument("--gpus-per-holder", type=float, help="GPUs (fractions allowed) per holder (default 0)")
    group.add_argument("--ray-address", help="join an existing Ray cluster (ADDRESS or auto)")
    group.add_argument("--connect-timeout", type=float, metavar="SECONDS", help="how long the server waits for all "
                       "holders to connect before it names the missing ones and stops (default 120)")
    group.add_argument("--round-timeout", type=float, metavar="SECONDS", help="how long a round waits for replies; "
                       "holders that have not replied by then count as failed (default: wait for all)")
    group.add_argument("--holder-cache", type=int, help="holders kept in memory per worker (default 16)")
    group.add_argument("--fail-holders", metavar="ID[,ID]", help="make these holders fail, to test failure handling")
    group.add_argument("--fail-stage", choices=("train", "evaluate"), help="where injected failures happen")
    return parser.parse_args(argv)


HOLDER_SIDE_FLAGS = ("holder_seed", "holder_key_families", "holder_min_block_size")


def floor_from_args(args: argparse.Namespace) -> SecurityFloor:
    """The holders' security floor the launcher hands them."""
    families = FAMILIES if not args.holder_key_families else tuple(
        part.strip() for part in args.holder_key_families.split(",") if part.strip())
    minimum = DEFAULT_MIN_BLOCK_SIZE if args.holder_min_block_size is None else args.holder_min_block_size
    return SecurityFloor(families, minimum)


def check_floor(plan: RunPlan, floor: SecurityFloor) -> None:
    """What every holder would refuse, refused once before anything starts."""
    floor.check_request(plan.config.key_family, plan.config.block_size, plan.placement.dataset.image_shape,
                        key_padding(plan.config.key_padding, plan.model.first))


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment's settings from the command line; with --download, the launcher fetches a missing dataset
    here, once (the ServerApp and the holders never download)."""
    overrides = {
        name: value
        for name, value in vars(args).items()
        if name not in ("config", "resume", "download", "strategy_arg", "local_layers", "fail_holders", *HOLDER_SIDE_FLAGS)
    }
    if args.strategy_arg:
        overrides["strategy_args"] = parse_strategy_args(args.strategy_arg)
    if args.local_layers is not None:
        overrides["local_layers"] = [item.strip() for item in args.local_layers.split(",") if item.strip()]
    if args.fail_holders is not None:
        overrides["fail_holders"] = _int_list("--fail-holders", args.fail_holders)
    config = build_config(overrides, args.config)
    if args.download:
        load_dataset(config.dataset, data_dir=config.data_dir, image_size=config.image_size, download=True)
    return config


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated holder ids such as 2,5, got {text!r}") from None


# ------------------------------------------------------------------------------------------ the set-up
@dataclass
class Setup:
    """A dataset, the model (first convolution and backbone) and the holders' keys and channel orders."""

    dataset: ImageDataset
    model_name: str
    model: SplitModel | None
    first_layer_source: str
    keys: list[HolderKey]
    orders: list[list[int]] | None
    seed: int
    shuffle: str = "federation"
    key_source: str = "fresh entropy (not reproducible)"

    @property
    def first_conv(self) -> nn.Conv2d | None:
        return None if self.model is None else self.model.first

    def describe(self) -> dict:
        """Public facts about the set-up for a results file (never a secret, nor the holder seed itself)."""
        conv = self.first_conv
        return {
            "dataset": self.dataset.name,
            "image_shape": list(self.dataset.image_shape),
            "model": self.model_name,
            "first_layer": self.first_layer_source,
            "conv": None if conv is None else {
                "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
                "padding": list(conv.padding) if not isinstance(conv.padding, str) else conv.padding, "bias": conv.bias is not None,
            },
            "channel_order": "none" if self.orders is None else self.shuffle,
            "key_source": self.key_source,
            "seed": self.seed,
        }  # fmt: skip


def setup_from_arguments(args: argparse.Namespace, *, holders: int | None, with_model: bool = True) -> Setup:
    """The set-up the arguments of :func:`add_setup_arguments` describe, for holders ``0..holders-1``.

    ``holders`` None means all of a run's holders with ``--run``, and 3 without. Without ``with_model`` the first
    layer is left out (``model`` and ``orders`` are None) unless ``--key-padding conv`` needs its padding.
    """
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.run is not None:
        return _setup_from_run(args, holders, with_model)
    holders = 3 if holders is None else holders
    if isinstance(holders, bool) or not isinstance(holders, int) or holders < 1:
        raise UsageError(f"the number of holders must be a positive integer, got {holders!r}")
    settings = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in DEFAULTS.items()}
    if args.padding is not None and args.key_padding is not None:
        raise UsageError("--padding and --key-padding both set the key padding; give one of them")
    dataset = load_dataset(settings["dataset"], data_dir=args.data_dir, image_size=args.image_size, download=args.download)
    model, source = (None, "not used")
    if with_model or settings["key_padding"] == "conv":
        model, source = setup_model(settings["model"], dataset, seed=args.seed, path=args.first_layer)
    padding = args.padding if args.padding is not None else key_padding(settings["key_padding"], model.first if model else None)
    if args.holder_seed is not None:
        secrets = [HolderSecrets.from_holder_seed(args.holder_seed, holder) for holder in range(holders)]
        key_source = "drawn from --holder-seed (not recorded)"
    else:
        federation = os.urandom(SECRET_BYTES)  # one secret shared by the holders, for --shuffle federation
        secrets = [HolderSecrets.fresh(federation=federation) for _ in range(holders)]
        key_source = "fresh entropy (not reproducible)"
    keys = [
        draw_key(holder, dataset.image_shape, family=settings["key_family"], block_size=args.block_size,
                 entries=settings["key_entries"], padding=padding)
        for holder in secrets
    ]  # fmt: skip
    if not with_model:
        model, source = (None, "not used")
    orders = _orders(secrets, settings["shuffle"], model)
    if args.holder_seed is None:
        print(FRESH_KEYS_NOTE)
    return Setup(dataset, settings["model"], model, source, keys, orders, args.seed, settings["shuffle"], key_source)


def setup_model(name: str, dataset: ImageDataset, *, seed: int, path: Path | None = None) -> tuple[SplitModel, str]:
    """The model, initialised from ``seed``; its first convolution frozen, random or loaded from ``path``.

    ``path`` is a checkpoint with ``first`` (the convolution's state dict), such as a run's
    ``first_layer.pt``; a checkpoint's ``backbone`` is not used.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, in_channels=dataset.channels, num_classes=max(dataset.num_classes, 2), image_size=dataset.image_shape[1])
    source = f"random initialisation (seed {seed})"
    if path is not None:
        load_first_layer(Path(path), model, with_backbone=False)
        source = f"loaded from {path}"
    model.first.requires_grad_(False)
    return model, source


# ------------------------------------------------------------------------------------------ internals
def _setup_from_run(args: argparse.Namespace, holders: int | None, with_model: bool) -> Setup:
    """A finished run's set-up: its config.json, its first_layer.pt, and each holder's key.mple and secrets.json."""
    run_dir = Path(args.run)
    given = [flag for name, flag in RUN_DECIDES.items() if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{given[0]} is decided by the run in --run {run_dir} (its config.json and holder folders); "
                         "leave it out, or drop --run")
    config_path = run_dir / RUN_MARKER
    if not config_path.is_file():
        raise UsageError(f"--run {run_dir} has no {RUN_MARKER}; give the folder of a finished simulation.run")
    try:
        config = ExperimentConfig.from_json(config_path.read_text())
    except (ValueError, TypeError):
        raise UsageError(f"{config_path} is not a simulation.run config; give the folder of a finished run") from None
    holders = config.holders if holders is None else holders
    if isinstance(holders, bool) or not isinstance(holders, int) or not 1 <= holders <= config.holders:
        raise UsageError(f"the run in {run_dir} has holders 0..{config.holders - 1}; ask for holders among them "
                         f"(got {holders!r} holders)")
    data_dir = args.data_dir if args.data_dir is not None else config.data_dir
    dataset = load_dataset(config.dataset, data_dir=data_dir, image_size=config.image_size)
    homes = [holder_home(run_dir, holder) for holder in range(holders)]
    for home in homes:
        if not (home / KEY_FILE).is_file():
            raise UsageError(f"holder folder {home} has no {KEY_FILE}; the run did not set that holder up, so ask for "
                             "fewer holders or use a finished run")
    keys = [HolderKey.load(home / KEY_FILE, image_shape=dataset.image_shape) for home in homes]
    model, source, orders = None, "not used", None
    if with_model:
        first_layer = run_dir / FIRST_LAYER_FILE
        if not first_layer.is_file():
            raise UsageError(f"--run {run_dir} has no {FIRST_LAYER_FILE}; give the folder of a finished simulation.run")
        model, source = setup_model(config.model, dataset, seed=args.seed, path=first_layer)
        if config.shuffle != "none":
            orders = _orders([_run_secrets(home) for home in homes], config.shuffle, model)
    return Setup(dataset, config.model, model, source, keys, orders, args.seed, config.shuffle, f"from run {run_dir}")


def _run_secrets(home: Path) -> HolderSecrets:
    """A run holder's secrets, read only: clients.secrets.holder_secrets would draw and save new ones if missing."""
    path = home / SECRETS_FILE
    if not path.is_file():
        raise UsageError(f"holder folder {home} has no {SECRETS_FILE}, so its channel order is unknown; use a run "
                         "made with holder secrets")
    return HolderSecrets.load(path)


def _orders(secrets: Sequence[HolderSecrets], shuffle: str, model: SplitModel | None) -> list[list[int]] | None:
    """Each holder's secret channel order; None without a first layer or a secret order (`--shuffle none`)."""
    if model is None or shuffle == "none":
        return None
    return [channel_order(holder, shuffle, model.first.out_channels).tolist() for holder in secrets]


