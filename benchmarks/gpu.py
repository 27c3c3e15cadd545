"""The GPU path, measured in one command (under five minutes on one GPU), needing nothing but this repository:

  1. AugConv on VGG-16 per key family: a training step (forward, backward, SGD step) with AugConv in front
     against the same step with the plain frozen first convolution, CIFAR-shaped 3x32x32 batches of 128 on the GPU;
     the two alternate, times are medians after warm-up, each step synchronised.
  2. The federation overhead as benchmarks.simulation measures it ((a) plain loop, (b) MpLe loop, (c) the engine),
     with the holders on the GPU (--gpus-per-holder 0.25: four holders share it).
  3. Holders per second through simulation.run's engine at 10 and 100 holders (one round: train and evaluate).

The data is generated (random CIFAR-shaped images, 10 classes), so that the run needs no download and no shared
folder. Without CUDA it says so in one line and exits with code 0; --smoke runs the script on the CPU at toy sizes.

    python -m benchmarks.gpu [--out results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.augconv import FAMILY_KEYS
from benchmarks.simulation import main as simulation_benchmark
from clients.augconv import AugConv
from clients.keys import HolderKey
from clients.morphing import morph
from simulation.config import build_config
from simulation.models import build_model
from simulation.run import holder_side, run_variant

BATCH = 128
REPEATS = 20


def synthetic_cifar(path: Path, images: int = 6000, seed: int = 0) -> Path:
    generator = np.random.default_rng(seed)
    np.savez(path, train_images=generator.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8),
             train_labels=generator.integers(0, 10, images), test_images=generator.integers(0, 256, (1000, 32, 32, 3),
                                                                                            dtype=np.uint8),
             test_labels=generator.integers(0, 10, 1000))
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ratio(family: str, device: torch.device, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model("vgg16", in_channels=3, num_classes=10, image_size=32)
    model.first.requires_grad_(False)
    key = HolderKey.generate((3, 32, 32), seed=0, **FAMILY_KEYS[family])
    started = time.perf_counter()
    aug = AugConv.from_conv(model.first, key).to(device)
    build_s = time.perf_counter() - started
    model.to(device)
    optimizer = torch.optim.SGD(model.backbone.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 32, 32, device=device)
    morphed = morph(images, key)
    labels = torch.randint(10, (batch,), device=device)
    criterion = torch.nn.CrossEntropyLoss()

    def step(first, inputs) -> float:
        synchronize(device)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model.backbone(first(inputs)), labels).backward()
        optimizer.step()
        synchronize(device)
        return time.perf_counter() - began

    for _ in range(3):  # warm-up: kernels chosen, memory pooled
        step(model.first, images), step(aug, morphed)
    plain, augmented = [], []
    for _ in range(repeats):
        plain.append(step(model.first, images))
        augmented.append(step(aug, morphed))
    error = ((aug(morphed) - model.first(images)).abs().max() / model.first(images).abs().max()).item()
    return {"family": family, "q": key.block_size, "build_s": build_s, "memory_mib": aug.memory_bytes / 2**20,
            "plain_step_ms": 1000 * statistics.median(plain), "aug_step_ms": 1000 * statistics.median(augmented),
            "step_ratio": statistics.median(augmented) / statistics.median(plain), "float32_relative_error": error}


def holders_per_second(holders: int, dataset: str, gpus_per_holder: float) -> dict:
    config = build_config({"holders": holders, "rounds": 1, "dataset": dataset, "model": "cnn", "first_layer": "random",
                           "augment": False, "gpus_per_holder": gpus_per_holder, "cpus_per_holder": 1})
    with tempfile.TemporaryDirectory(prefix="mple-gpu-") as folder:
        run_dir = Path(folder) / "run"
        started = time.perf_counter()
        metrics = run_variant(config, run_dir, "mple", holder_side(config, run_dir, holder_seed=0),
                              progress=lambda line: None)
        total = time.perf_counter() - started
    round_s = metrics["rounds"][0]["seconds"]
    return {"holders": holders, "round_s": round_s, "holders_per_s": holders / round_s, "run_s": total,
            "trained": metrics["rounds"][0]["holders_trained"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--gpus-per-holder", type=float, default=0.25)
    parser.add_argument("--smoke", action="store_true",
                        help="check the script itself on the CPU, at toy sizes (the figures mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        return measure(torch.device("cpu"), args.out, gpus_per_holder=0.0, batch=4, repeats=2, holders=(4, 6),
                       rounds=2)
    if not torch.cuda.is_available():
        print(f"benchmarks.gpu: no CUDA device here (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU")
        return 0
    print(f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}", flush=True)
    return measure(torch.device("cuda"), args.out, gpus_per_holder=args.gpus_per_holder, batch=BATCH,
                   repeats=REPEATS, holders=(10, 100), rounds=3)


def measure(device: torch.device, out: Path | None, *, gpus_per_holder: float, batch: int, repeats: int,
            holders: tuple[int, int], rounds: int) -> int:
    figures: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                     "gpus": torch.cuda.device_count()}
    print(f"\n1. AugConv on VGG-16, batch {batch} of 3x32x32, training step on {device}", flush=True)
    figures["augconv"] = []
    for family in FAMILY_KEYS:
        result = step_ratio(family, device, batch, repeats)
        figures["augconv"].append(result)
        print(f"   {family:<9} q={result['q']:>4}  AugConv {result['memory_mib']:8.1f} MiB  built in "
              f"{result['build_s']:5.2f} s  step {result['plain_step_ms']:6.2f} ms plain, {result['aug_step_ms']:6.2f} ms "
              f"AugConv: ratio {result['step_ratio']:.2f}  float32 error {result['float32_relative_error']:.1e}",
              flush=True)

    with tempfile.TemporaryDirectory(prefix="mple-gpu-data-") as folder:
        dataset = f"npz:{synthetic_cifar(Path(folder) / 'cifar-shaped.npz')}"
        print(f"\n2. Federation overhead, holders on {device} ({gpus_per_holder:g} GPU each)", flush=True)
        overhead = Path(folder) / "simulation.json"
        simulation_benchmark(["--dataset", dataset, "--holders", str(holders[0]), "--rounds", str(rounds),
                              "--gpus-per-holder", str(gpus_per_holder), "--out", str(overhead)])
        figures["federation"] = json.loads(overhead.read_text())

        print("\n3. Holders per second through the engine (one round)", flush=True)
        figures["throughput"] = []
        for count in holders:
            result = holders_per_second(count, dataset, gpus_per_holder)
            figures["throughput"].append(result)
            print(f"   {count:>4} holders: round {result['round_s']:.1f} s, {result['holders_per_s']:.1f} holders/s "
                  f"({result['trained']} trained; whole run {result['run_s']:.1f} s)", flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
