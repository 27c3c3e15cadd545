"""What the federation engine costs, separated from the work, side by side in one run on the same cores:

  (a) a hand-written FedAvg loop with the plain frozen first layer;
  (b) the same loop doing MpLe exactly as a holder does: the holder's own key, morphed batches, its AugConv
      (clients.holder.Holder: key drawn and AugConv built in round 1, kept in the holder's folder);
  (c) `simulation.run`'s engine (simulation.run.run_variant): Flower's ServerApp and ClientApp on Ray actors.

Equal resources: (a) and (b) run in as many worker processes as (c) has Ray actors (cores / --cpus-per-holder),
each with --cpus-per-holder torch threads; holder h always trains in worker h mod P (a hand-written loop keeps its
holders where they are). Same holders, data, epochs, batch order seeds, model and first layer in all three. Every
round of every loop is train + evaluate of every holder, the weighted mean of the backbones between.

The engine's overhead per holder-message is (round of (c) - round of (b)) / (2 x holders) (a train and an
evaluate message per holder and round), from the rounds after the first (round 1 also draws keys and builds
AugConvs, in (b) and (c) alike, and is shown apart). Its breakdown comes from (c) itself: with MPLE_PROFILE set
(simulation.profile) the server and every holder process log the time of each phase, summed here per
holder-message; what no phase accounts for is Flower's and Ray's transport and scheduling (the remainder).
Start-up (Ray, phase 0, the first messages that start the actors) is reported apart.

    python -m benchmarks.simulation --holders 10 --rounds 4 --out results/simulation.json
    python -m benchmarks.simulation --dataset medmnist:pneumoniamnist --data ../shared/data/medmnist

Targets (the benchmark says met or missed): rounds of (c) at most 1.10x those of (b); start-up under 15 s for 10
holders on a 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clients.augconv import augconv_bytes
from clients.holder import Holder, holder_home, key_padding
from clients.secrets import provision_holders
from server.first_layer import form_first_layer, initial_model
from simulation.config import build_config
from simulation.data import image_batches
from simulation.models import permute_first_layer_channels
from simulation.placement import placement_for
from simulation.profile import PROFILE_ENV, read_profile
from simulation.protocol import HolderSettings
from simulation.run import holder_side, run_variant
from simulation.training import evaluate, pick_device, train_epochs

RATIO_TARGET = 1.10
STARTUP_TARGET_S = 15.0
HOLDER_PHASES = ("settings", "decode", "holder set-up and cache", "local state and state dicts", "reply")
SERVER_PHASES = ("configure", "audit", "push", "aggregate", "checkpoint")


# ---------------------------------------------------------------- (a) and (b): worker processes
_WORKER: dict = {}


def _worker_start(config_dict: dict, mple: bool, holders_root: str, first_state: dict, backbone_state: dict,
                  threads: int) -> None:
    torch.set_num_threads(threads)
    config = build_config(config_dict)
    device = pick_device(config.gpus_per_holder)
    placement = placement_for(config)
    model = initial_model(config, placement)
    model.first.load_state_dict(first_state)
    model.backbone.load_state_dict(backbone_state)
    model.first.requires_grad_(False)
    model.to(device)
    _WORKER.update(config=config, placement=placement, model=model, mple=mple, root=Path(holders_root), device=device,
                   settings=HolderSettings.from_config(config, "mple"), holders={}, evaluations={})


def _holder(holder_id: int) -> Holder:
    """The holder's own Holder, made on first use in this worker (key drawn, AugConv built), as a ClientApp does."""
    holders = _WORKER["holders"]
    if holder_id not in holders:
        root = _WORKER["root"]
        home = holder_home(root.parent, holder_id)
        secrets = provision_holders(root, holder_seed=0).secrets_for(home, holder_id)
        holders[holder_id] = Holder(holder_id, _WORKER["settings"], home, secrets, _WORKER["model"].first,
                                    _WORKER["device"])
    return holders[holder_id]


def _batches(holder_id: int, split: str, seed: int | None):
    """(a): plain images through the plain frozen first layer; (b): the holder's morphed images and its AugConv."""
    if _WORKER["mple"]:
        holder = _holder(holder_id)
        return holder.first, holder.batches(split, shuffle_seed=seed)
    placement, config = _WORKER["placement"], _WORKER["config"]
    dataset = placement.dataset
    indices = placement.holder_train[holder_id] if split == "train" else placement.holder_test[holder_id]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return _WORKER["model"].first, image_batches(dataset.train, indices, batch_size=config.batch_size,
                                                 mean=dataset.mean, std=dataset.std, generator=generator,
                                                 device=_WORKER["device"])


def _backbone(state: dict, holder_id: int):
    backbone = _WORKER["model"].backbone
    backbone.load_state_dict(state)
    if _WORKER["mple"] and _WORKER["settings"].shuffle == "holder":
        permute_first_layer_channels(_WORKER["model"], _holder(holder_id).order)
    return backbone


def _evaluate(holder_id: int, state: dict, server_round: int) -> tuple[float, float]:
    first, batches = _batches(holder_id, "test", None)
    loss, accuracy, _ = evaluate(first, _backbone(state, holder_id), batches)
    _WORKER["evaluations"][holder_id] = server_round
    return loss, accuracy


def worker_train(holder_id: int, server_round: int, state: dict) -> tuple[dict, int, float, float]:
    """One holder's training message: validation on its test split where the last evaluation was not of this
    model (round 1), then local epochs; (backbone state, examples, loss, seconds)."""
    started = time.perf_counter()
    config = _WORKER["config"]
    if _WORKER["evaluations"].get(holder_id) != server_round - 1:
        _evaluate(holder_id, state, server_round - 1)
    first, batches = _batches(holder_id, "train", 1000 * server_round + holder_id)
    backbone = _backbone(state, holder_id)
    loss, _, examples = train_epochs(first, backbone, batches, epochs=config.local_epochs, lr=config.lr,
                                     momentum=config.momentum, weight_decay=config.weight_decay)
    trained = {name: value.detach().cpu().clone() for name, value in backbone.state_dict().items()}
    return trained, examples, loss, time.perf_counter() - started


def worker_evaluate(holder_id: int, server_round: int, state: dict) -> float:
    started = time.perf_counter()
    _evaluate(holder_id, state, server_round)
    return time.perf_counter() - started


def hand_written_loop(config, overrides: dict, mple: bool, workers: int, threads: int, first_state: dict,
                      backbone_state: dict, root: Path) -> dict:
    """(a) or (b): rounds of train + evaluate in `workers` processes; per-round wall seconds and compute seconds."""
    context = multiprocessing.get_context("spawn")
    pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_worker_start,
                                 initargs=(overrides, mple, str(root), first_state, backbone_state, threads))
             for _ in range(workers)]
    try:
        for pool in pools:  # start the workers (imports, data) outside the timed rounds, as Ray's actors are
            pool.submit(time.sleep, 0).result()
        state = copy.deepcopy(backbone_state)
        rounds, compute = [], []
        for server_round in range(1, config.rounds + 1):
            started = time.perf_counter()
            jobs = [pools[h % workers].submit(worker_train, h, server_round, state) for h in range(config.holders)]
            results = [job.result() for job in jobs]
            total = sum(examples for _, examples, _, _ in results)
            state = {name: (sum(s[name].double() * n for s, n, _, _ in results) / total).to(value.dtype)
                     for name, value in results[0][0].items()}
            evaluations = [pools[h % workers].submit(worker_evaluate, h, server_round, state)
                           for h in range(config.holders)]
            seconds = [job.result() for job in evaluations] + [s for _, _, _, s in results]
            rounds.append(time.perf_counter() - started)
            compute.append(sum(seconds))
        return {"round_s": rounds, "compute_s": compute}
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------- multiply-adds, to explain (b) over (a)
def augconv_macs(augconv) -> int:
    """Multiply-adds of one morphed image through AugConv: each row group's patch (slots x q) times its weight."""
    groups, slots = augconv.block_index.shape
    return groups * slots * augconv.block_size * augconv.weight.shape[-1]


def backbone_macs(model, image_shape) -> tuple[int, int]:
    """(first layer, backbone) multiply-adds of one plain image, counted on the convolutions and linear layers."""
    counts = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            counts.append(output[0].numel() * kernel)
        elif isinstance(module, torch.nn.Linear):
            counts.append(module.in_features * module.out_features)

    hooks = [module.register_forward_hook(count) for module in model.modules()
             if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()
            model.backbone(model.first(torch.zeros(1, *image_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    return counts[0], sum(counts[1:])


def family_macs(config, model, image_shape, home: Path) -> dict:
    """The first layer's multiply-adds for a key of `config`'s family (one holder's key), against the plain one's,
    and what that makes of a training step (forward and backward of the backbone cost about 3x its forward; the
    frozen first layer only runs forward)."""
    conv, backbone = backbone_macs(model, image_shape)
    if config.key_family == "dense":  # one group using every weight once; no key drawn (a minute for 3x32x32)
        padding = key_padding(config.key_padding, model.first)
        domain = (image_shape[0], image_shape[1] + 2 * padding, image_shape[2] + 2 * padding)
        q = math.prod(domain)
        aug = augconv_bytes(model.first, domain, "dense", q, padding) // 4
    else:
        holder = Holder(0, HolderSettings.from_config(config, "mple"), home,
                        provision_holders(home / "holders", holder_seed=0).secrets_for(home / "h", 0), model.first,
                        torch.device("cpu"))
        q, aug = holder.key.block_size, augconv_macs(holder.first)
    return {"q": q, "augconv_macs": aug, "conv_macs": conv, "backbone_macs": backbone,
            "first_layer_ratio": aug / conv, "step_macs_ratio": (aug + 3 * backbone) / (conv + 3 * backbone)}


# ---------------------------------------------------------------- (c): the engine, profiled
def engine_run(config, run_dir: Path, profile: Path) -> dict:
    os.environ[PROFILE_ENV] = str(profile)  # Ray's servers start from this environment, and so do its workers
    marks = {"start": time.perf_counter()}
    try:
        metrics = run_variant(config, run_dir, "mple", holder_side(config, run_dir, holder_seed=0),
                              progress=lambda line: None,
                              on_ray_started=lambda instance: marks.setdefault("ray", time.perf_counter()))
    finally:
        os.environ.pop(PROFILE_ENV, None)
    total = time.perf_counter() - marks["start"]
    lines = read_profile(profile)
    server = {}
    for line in lines:
        if line["side"] == "server":
            server[line["phase"]] = server.get(line["phase"], 0.0) + line["s"]
    rounds = [row["seconds"] for row in metrics["rounds"]]
    return {"total_s": total, "ray_start_s": marks["ray"] - marks["start"], "round_s": rounds,
            "phase0_s": server.get("plan and phase 0", 0.0), "identify_s": server.get("identify and align", 0.0),
            "final_evaluation_s": server.get("final evaluation", 0.0),
            "startup_s": marks["ray"] - marks["start"] + server.get("plan and phase 0", 0.0)
            + server.get("identify and align", 0.0),
            "profile": lines, "accuracy": metrics["final"]["accuracy"]}


def in_rounds(profile: list[dict]) -> list[dict]:
    """The lines of phases that ran during the rounds: after the start-up's messages (identify, align), before
    the final evaluation."""
    server = {line["phase"]: line for line in profile if line["side"] == "server"}
    start = server["identify and align"]["t"]
    end = server["final evaluation"]["t"] - server["final evaluation"]["s"]
    return [line for line in profile if line["t"] - line["s"] >= start and line["t"] <= end]


def breakdown(profile: list[dict], messages: int) -> dict[str, float]:
    """Milliseconds per holder-message of each phase during the rounds (round 1 included, where the holders are
    set up: that is where set-up and cache cost)."""
    per_phase: dict[str, float] = {}
    for line in in_rounds(profile):
        if line["side"] == "holder" or line["phase"] in SERVER_PHASES:
            key = f"{line['side']}: {line['phase']}"
            per_phase[key] = per_phase.get(key, 0.0) + line["s"]
    return {key: 1000 * value / messages for key, value in sorted(per_phase.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--dataset", default=None, help="default: the CIFAR-10 subset in --data")
    parser.add_argument("--holders", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--key-family", default="repeated", help="the key of (b) and (c)")
    parser.add_argument("--families", default="",
                        help="comma-separated key families whose (b) is also run against (a), with their multiply-adds "
                             "(for example repeated,blocks,dense); (c) runs with --key-family only")
    parser.add_argument("--cpus-per-holder", type=float, default=1.0)
    parser.add_argument("--gpus-per-holder", type=float, default=0.0,
                        help="holders on CUDA: (c) gets this much of a GPU per holder, (a) and (b) one worker per share")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 sets the holders up, the later rounds are compared")
    dataset = args.dataset or f"npz:{(args.data / 'cifar10-subset.npz').resolve()}"
    overrides = {"holders": args.holders, "rounds": args.rounds, "dataset": dataset, "model": args.model,
                 "first_layer": "random", "augment": False, "key_family": args.key_family,
                 "cpus_per_holder": args.cpus_per_holder, "gpus_per_holder": args.gpus_per_holder}
    if args.dataset and args.dataset.startswith("medmnist:"):
        overrides["data_dir"] = str(args.data)
    config = build_config(overrides)
    placement = placement_for(config)
    model = initial_model(config, placement)
    form_first_layer(config, placement, model, progress=lambda line: None)
    first_state, backbone_state = model.first.state_dict(), model.backbone.state_dict()
    workers = max(1, int((os.cpu_count() or 1) // config.cpus_per_holder))
    if config.gpus_per_holder > 0:
        workers = max(1, min(workers, int(torch.cuda.device_count() / config.gpus_per_holder)))
    threads = max(1, int(config.cpus_per_holder))
    messages = 2 * config.holders * config.rounds

    with tempfile.TemporaryDirectory(prefix="mple-bench-") as folder:
        folder = Path(folder)
        print(f"{config.holders} holders, {config.rounds} rounds, {config.model} on {dataset}, key "
              f"{config.key_family}; {workers} workers x {threads} thread(s) for (a) and (b), Ray actors of "
              f"{config.cpus_per_holder:g} CPU for (c)", flush=True)
        plain = hand_written_loop(config, overrides, False, workers, threads, first_state, backbone_state, folder / "a" / "holders")
        print(f"(a) plain loop   rounds {_fmt(plain['round_s'])}", flush=True)
        mple = hand_written_loop(config, overrides, True, workers, threads, first_state, backbone_state, folder / "b" / "holders")
        print(f"(b) MpLe loop    rounds {_fmt(mple['round_s'])}", flush=True)
        engine = engine_run(config, folder / "c", folder / "profile.jsonl")
        print(f"(c) simulation   rounds {_fmt(engine['round_s'])}", flush=True)
        per_family = {}
        for family in [name for name in args.families.split(",") if name]:
            family_config = build_config({**overrides, "key_family": family})
            if family == "dense":  # its keys take about a minute each to draw here: multiply-adds only
                per_family[family] = family_macs(family_config, model, placement.dataset.image_shape,
                                                 folder / "macs-dense")
                continue
            run = mple if family == config.key_family else hand_written_loop(
                family_config, {**overrides, "key_family": family}, True, workers, threads, first_state,
                backbone_state, folder / f"b-{family}" / "holders")
            per_family[family] = {"mple_round_s": run["round_s"],
                                  "ratio_mple_loop": statistics.mean(run["round_s"][1:])
                                  / statistics.mean(plain["round_s"][1:]),
                                  **family_macs(family_config, model, placement.dataset.image_shape,
                                                folder / f"macs-{family}")}
            print(f"(b) MpLe loop, {family:<8} rounds {_fmt(run['round_s'])}", flush=True)

    steady = slice(1, None)
    a, b, c = (statistics.mean(run["round_s"][steady]) for run in (plain, mple, engine))
    # Over all rounds, round 1's set-up included, as the profile covers them all.
    overhead_ms = 1000 * (sum(engine["round_s"]) - sum(mple["round_s"])) / messages
    parts = breakdown(engine["profile"], messages)
    engine_compute_ms = parts.pop("holder: compute", 0.0)
    holder_total = parts.pop("holder: train message", 0.0) + parts.pop("holder: evaluate message", 0.0)
    mple_compute_ms = 1000 * sum(mple["compute_s"]) / messages
    # Holder phases run in `workers` actors at once, so each costs the round 1/workers of its time.
    wall = {key: value / (workers if key.startswith("holder") else 1) for key, value in parts.items()}
    wall["holder: compute slower than in (b) (the driver and Ray's processes share the cores)"] = (engine_compute_ms
                                                                              - mple_compute_ms) / workers
    remainder_ms = overhead_ms - sum(wall.values())
    figures = {
        "holders": config.holders, "rounds": config.rounds, "dataset": dataset, "model": config.model,
        "key_family": config.key_family, "workers": workers, "threads_per_worker": threads,
        "plain_round_s": plain["round_s"], "mple_round_s": mple["round_s"], "engine_round_s": engine["round_s"],
        "ratio_engine": c / b, "ratio_mple_loop": b / a, "ratio_engine_round1": engine["round_s"][0] / mple["round_s"][0],
        "overhead_ms_per_message": overhead_ms,
        "startup_s": engine["startup_s"], "ray_start_s": engine["ray_start_s"], "phase0_s": engine["phase0_s"],
        "first_messages_s": engine["identify_s"], "final_evaluation_s": engine["final_evaluation_s"],
        "engine_total_s": engine["total_s"],
        "overhead_ms_per_message_after_round_1": 1000 * (c - b) / (2 * config.holders),
        "breakdown_ms_per_message": wall,
        "holder_cpu_ms_per_message": parts,
        "holder_compute_ms_per_message": {"engine": engine_compute_ms, "mple_loop": mple_compute_ms},
        "holder_message_total_ms": holder_total,
        "remainder_ms_per_message": remainder_ms,
        "targets": {"ratio_engine": c / b <= RATIO_TARGET, "startup": engine["startup_s"] < STARTUP_TARGET_S},
        "per_family": per_family,
    }
    print(f"\nper round, after round 1 (mean of rounds 2-{config.rounds}):  (a) {a:.2f} s   (b) {b:.2f} s   "
          f"(c) {c:.2f} s")
    print(f"(b)/(a) MpLe over plain:          {b / a:.2f}")
    print(f"(c)/(b) engine over MpLe loop:    {c / b:.2f}  (target <= {RATIO_TARGET}: "
          f"{'met' if figures['targets']['ratio_engine'] else 'missed'}); round 1 (holder set-up): "
          f"{figures['ratio_engine_round1']:.2f}")
    print(f"engine overhead per holder-message: {overhead_ms:.1f} ms over all rounds, "
          f"{figures['overhead_ms_per_message_after_round_1']:.1f} ms after round 1")
    print("  where it goes, ms of the round per holder-message (a holder phase's time / the "
          f"{workers} actors working at once):")
    for key, value in wall.items():
        print(f"    {key}".ljust(76) + f"{value:8.2f}")
    print("    Flower + Ray: serialisation, transport, scheduling (the remainder)".ljust(76) + f"{remainder_ms:8.2f}")
    print(f"  holder compute per message: {engine_compute_ms:.1f} ms in (c), {mple_compute_ms:.1f} ms in (b)")
    print(f"start-up {engine['startup_s']:.1f} s (target < {STARTUP_TARGET_S:.0f} s: "
          f"{'met' if figures['targets']['startup'] else 'missed'}): Ray {engine['ray_start_s']:.1f} s, plan and "
          f"phase 0 {engine['phase0_s']:.1f} s, first messages (actors start) {engine['identify_s']:.1f} s; "
          f"final evaluation {engine['final_evaluation_s']:.1f} s")
    if per_family:
        print("\n(b) over (a) per key family, and multiply-adds per image (first layer; training step = first layer "
              "forward + 3x backbone forward)")
        for family, row in per_family.items():
            measured = f"{row['ratio_mple_loop']:5.2f}" if "ratio_mple_loop" in row else "  -  "
            print(f"  {family:<9} q={row['q']:>5}  (b)/(a) {measured}   first layer "
                  f"{row['augconv_macs'] / 1e6:8.2f} M against {row['conv_macs'] / 1e6:.2f} M "
                  f"({row['first_layer_ratio']:.1f}x)   step {row['step_macs_ratio']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures: {args.out}")
    return 0


def _fmt(values) -> str:
    return " ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    raise SystemExit(main())
