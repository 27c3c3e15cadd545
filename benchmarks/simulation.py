"""What the federation machinery costs: a real `simulation.run` (Flower + Ray, morphing, AugConv, messages,
checkpoints) against the same local training done one holder after another in a plain PyTorch loop (same
model, data, epochs, plain first layer, FedAvg by hand), measured side by side in one run.

    python -m benchmarks.simulation --data ../shared/data --holders 10 --rounds 3

Target: rounds of the real run at most 1.3x the plain loop where each holder-round has at least 2 s of compute.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from server.first_layer import initial_model
from simulation.config import build_config
from simulation.data import image_batches
from simulation.placement import placement_for
from simulation.run import holder_side, run_variant
from simulation.seeds import derive_seed
from simulation.training import evaluate, train_epochs


def plain_loop(config) -> tuple[float, list[float]]:
    """FedAvg rounds, holder after holder, in this process: the work a federation does, without the federation."""
    federation = placement_for(config)
    dataset = federation.dataset
    model = initial_model(config, federation)
    model.first.requires_grad_(False)
    global_state = copy.deepcopy(model.backbone.state_dict())

    def batches(indices, seed=None):
        return image_batches(dataset.train, indices, batch_size=config.batch_size, mean=dataset.mean, std=dataset.std,
                             generator=None if seed is None else torch.Generator().manual_seed(seed))

    round_seconds = []
    started = time.perf_counter()
    for server_round in range(1, config.rounds + 1):
        round_start = time.perf_counter()
        states, weights = [], []
        for holder in range(config.holders):
            model.backbone.load_state_dict(global_state)
            train_epochs(model.first, model.backbone,
                         batches(federation.holder_train[holder], derive_seed(config.seed, holder, server_round)),
                         epochs=config.local_epochs, lr=config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay)
            states.append(copy.deepcopy(model.backbone.state_dict()))
            weights.append(len(federation.holder_train[holder]))
        total = sum(weights)
        global_state = {name: (sum(w * s[name].double() for w, s in zip(weights, states)) / total).to(value.dtype)
                        for name, value in states[0].items()}
        model.backbone.load_state_dict(global_state)
        for holder in range(config.holders):
            evaluate(model.first, model.backbone, batches(federation.holder_test[holder]))
        round_seconds.append(time.perf_counter() - round_start)
    return time.perf_counter() - started, round_seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--dataset", default=None, help="default: the CIFAR-10 subset in --data")
    parser.add_argument("--holders", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    dataset = args.dataset or f"npz:{(args.data / 'cifar10-subset.npz').resolve()}"
    config = build_config({"holders": args.holders, "rounds": args.rounds, "dataset": dataset, "model": args.model,
                           "first_layer": "random", "augment": False})
    placement_for(config)  # load once, outside both timings

    torch.set_num_threads(int(config.cpus_per_holder))
    plain_total, plain_rounds = plain_loop(config)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run_dir = Path(folder) / "run"
        metrics = run_variant(config, run_dir, "mple", holder_side(config, run_dir, holder_seed=0),
                              progress=lambda line: None)
        real_total = time.perf_counter() - started
    real_rounds = [row["seconds"] for row in metrics["rounds"]]
    per_holder_round = sum(plain_rounds) / (config.rounds * config.holders)
    figures = {
        "holders": config.holders, "rounds": config.rounds, "dataset": dataset, "model": config.model,
        "plain_loop_s": plain_total, "plain_round_s": plain_rounds,
        "simulation_total_s": real_total, "simulation_round_s": real_rounds,
        "ratio_rounds": sum(real_rounds) / sum(plain_rounds), "ratio_total": real_total / plain_total,
        "compute_per_holder_round_s": per_holder_round,
    }
    print(f"{config.holders} holders, {config.rounds} rounds, {config.model} on {dataset}")
    print(f"plain PyTorch loop (one holder after another): {plain_total:7.1f} s  rounds {_fmt(plain_rounds)}")
    print(f"simulation.run (Flower + Ray, MpLe):          {real_total:7.1f} s  rounds {_fmt(real_rounds)}")
    print(f"compute per holder-round: {per_holder_round:.2f} s (target applies at >= 2 s)")
    verdict = "PASS" if figures["ratio_rounds"] <= 1.3 else "MISS"
    print(f"ratio, rounds only: {figures['ratio_rounds']:.2f} (target <= 1.3: {verdict}); "
          f"whole run incl. Ray start and phase 0: {figures['ratio_total']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


def _fmt(values) -> str:
    return " ".join(f"{value:.1f}" for value in values)


if __name__ == "__main__":
    raise SystemExit(main())
