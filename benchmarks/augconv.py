"""AugConv cost on VGG-16's first layer for 3x32x32 images (or another model and image size), per key family, in one run.

For each family it measures key generation, AugConv construction, AugConv memory, the float32
error of ``AugConv(morph(x))`` against the plain convolution, and a full VGG-16 training step
(forward, backward and SGD step of the backbone) with AugConv in front, against the same step with
the plain frozen first convolution, and the first layer's forward pass alone, AugConv against the
plain convolution (less noisy than whole steps). The two kinds of step alternate, so load from other
programs on a shared machine hits both alike; times are medians, and the step ratio is of medians. The
peak memory is the process's resident memory during the construction above what it was before. A
family whose key and AugConv the run's memory check (server.plan.check_memory) refuses is reported
with the check's estimate instead of being built.

    python -m benchmarks.augconv --families repeated,blocks --repeats 5 --out results/augconv.json
    python -m benchmarks.augconv --model cnn --channels 1 --image-size 128 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python benchmarks/augconv.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from clients.augconv import AugConv
from clients.keys import HolderKey
from clients.morphing import morph
from server.plan import check_memory
from simulation.config import ExperimentConfig
from simulation.errors import UsageError
from simulation.files import atomic_write_json
from simulation.models import MODEL_NAMES, build_model

NUM_CLASSES = 10
MIB = 2**20

# Keys as the two schemes use them: MpLe's block keys over the image as is (q = one image row, the default),
# MoLe's dense key over the image zero-padded by the first layer's padding.
FAMILY_KEYS = {
    "repeated": dict(family="repeated", padding=0),
    "blocks": dict(family="blocks", padding=0),
    "dense": dict(family="dense", padding=1),
}


@dataclass(frozen=True)
class Targets:
    step_ratio: float
    memory_mib: float | None
    build_s: float


TARGETS = {
    "repeated": Targets(step_ratio=1.05, memory_mib=4, build_s=1),
    "blocks": Targets(step_ratio=1.10, memory_mib=100, build_s=1),
    "dense": Targets(step_ratio=1.6, memory_mib=None, build_s=10),
}


def parse_families(text: str) -> list[str]:
    families = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [family for family in families if family not in FAMILY_KEYS]
    if not families or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(FAMILY_KEYS)}, got {text!r}")
    return families


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", type=parse_families, default=list(FAMILY_KEYS), help="comma-separated, default all")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed training steps of each kind (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default 64)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, the keys and the data (default 0)")
    parser.add_argument("--model", choices=MODEL_NAMES, default="vgg16", help="whose first layer (default vgg16)")
    parser.add_argument("--image-size", type=positive_int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--channels", type=positive_int, choices=(1, 3), default=3, help="image channels (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")
    return parser.parse_args(argv)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def training_step(first, backbone, optimizer, inputs, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(backbone(first(inputs)), labels).backward()
    optimizer.step()


def step_times(plain, aug, backbone, optimizer, images, morphed, labels, repeats: int) -> tuple[list[float], list[float]]:
    """Alternating plain and AugConv training steps, after one untimed warm-up step of each."""
    plain_times, aug_times = [], []
    for repeat in range(repeats + 1):
        _, plain_time = timed(training_step, plain, backbone, optimizer, images, labels)
        _, aug_time = timed(training_step, aug, backbone, optimizer, morphed, labels)
        if repeat:
            plain_times.append(plain_time)
            aug_times.append(aug_time)
    return plain_times, aug_times


def forward_times(plain, aug, images, morphed, repeats: int) -> tuple[list[float], list[float]]:
    """The first layer alone: alternating plain and AugConv forward passes, after one untimed pass of each."""
    plain_times, aug_times = [], []
    with torch.no_grad():
        for repeat in range(repeats + 1):
            _, plain_time = timed(plain, images)
            _, aug_time = timed(aug, morphed)
            if repeat:
                plain_times.append(plain_time)
                aug_times.append(aug_time)
    return plain_times, aug_times


def float32_error(aug: AugConv, conv: torch.nn.Conv2d, key: HolderKey, images: torch.Tensor) -> float:
    with torch.no_grad():
        expected = F.conv2d(images.double(), conv.weight.double(), conv.bias.double(), padding=conv.padding)
        actual = aug(morph(images, key)).double()
    return float((actual - expected).abs().max() / expected.abs().max())


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def with_peak_memory(function, *args):
    """(result, seconds, peak resident bytes above the start) of one call, resident memory sampled every 5 ms."""
    start, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result, seconds = timed(function, *args)
    finally:
        done.set()
        sampler.join()
    return result, seconds, max(peak[0], resident_bytes()) - start


def benchmark_family(family: str, model, images, labels, optimizer, args) -> dict:
    conv = model.first
    image_shape = tuple(images.shape[1:])
    settings = FAMILY_KEYS[family]
    try:
        estimate = check_memory(ExperimentConfig(holders=1, key_family=family), image_shape, model, settings["padding"])
    except UsageError as refusal:
        return {"family": family, "refused": str(refusal)}
    key, key_s = timed(HolderKey.generate, image_shape, seed=args.seed, **settings)
    aug, build_s, build_peak = with_peak_memory(AugConv.from_conv, conv, key)
    morphed, morph_s = timed(morph, images, key)
    plain_times, aug_times = step_times(conv, aug, model.backbone, optimizer, images, morphed, labels, args.repeats)
    plain_step, aug_step = statistics.median(plain_times), statistics.median(aug_times)
    plain_forwards, aug_forwards = forward_times(conv, aug, images, morphed, args.repeats)
    out_pixels = (image_shape[1] + 2 * conv.padding[0] - conv.kernel_size[0] + 1) ** 2
    return {
        "family": family,
        "key": key.summary(),
        "key_generation_s": key_s,
        "build_s": build_s,
        "memory_bytes": aug.memory_bytes,
        "build_peak_bytes": build_peak,
        "memory_check_estimate_bytes": estimate,
        "naive_dense_bytes": key.size * conv.out_channels * out_pixels * 4,
        "morph_batch_s": morph_s,
        "plain_step_s": plain_step,
        "aug_step_s": aug_step,
        "step_ratio": aug_step / plain_step,
        "plain_step_times_s": plain_times,
        "aug_step_times_s": aug_times,
        "plain_forward_s": statistics.median(plain_forwards),
        "aug_forward_s": statistics.median(aug_forwards),
        "float32_max_relative_error": float32_error(aug, conv, key, images[:16]),
        "float32_expected_error": key.expected_float32_error(),
        "layer": repr(aug),
    }


def verdicts(result: dict) -> dict[str, bool]:
    if "refused" in result:
        return {}
    targets = TARGETS[result["family"]]
    checks = {
        f"step ratio <= {targets.step_ratio}": result["step_ratio"] <= targets.step_ratio,
        f"build <= {targets.build_s:g} s": result["build_s"] <= targets.build_s,
    }
    if targets.memory_mib is not None:
        checks[f"memory <= {targets.memory_mib:g} MiB"] = result["memory_bytes"] <= targets.memory_mib * MIB
    return checks


def print_table(results: list[dict]) -> None:
    header = (
        f"{'family':<9} {'q':>5} {'pad':>3} {'key s':>7} {'build s':>8} {'memory MiB':>11} {'peak MiB':>9} {'morph s':>8} "
        f"{'conv fwd s':>11} {'aug fwd s':>10} {'plain step s':>13} {'aug step s':>11} {'ratio':>6} {'f32 rel err':>11} {'(estimate)':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "refused" in r:
            print(f"{r['family']:<9} refused by the memory check: {r['refused']}")
            continue
        key = r["key"]
        print(
            f"{r['family']:<9} {key['block_size']:>5} {key['padding']:>3} {r['key_generation_s']:>7.2f} {r['build_s']:>8.2f} "
            f"{r['memory_bytes'] / MIB:>11.2f} {r['build_peak_bytes'] / MIB:>9.0f} {r['morph_batch_s']:>8.4f} "
            f"{r['plain_forward_s']:>11.4f} {r['aug_forward_s']:>10.4f} "
            f"{r['plain_step_s']:>13.3f} {r['aug_step_s']:>11.3f} {r['step_ratio']:>6.3f} "
            f"{r['float32_max_relative_error']:>11.1e} {r['float32_expected_error']:>10.1e}"
        )
    print()
    for r in results:
        if r["verdicts"]:
            line = ", ".join(f"{'PASS' if ok else 'MISS'} {name}" for name, ok in r["verdicts"].items())
            print(f"{r['family']:<9} {line}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    image_shape = (args.channels, args.image_size, args.image_size)
    model = build_model(args.model, in_channels=args.channels, num_classes=NUM_CLASSES, image_size=args.image_size)
    model.train()
    model.first.requires_grad_(False)
    optimizer = torch.optim.SGD(model.backbone.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, *image_shape, generator=generator)
    labels = torch.randint(NUM_CLASSES, (args.batch_size,), generator=generator)
    load_before = os.getloadavg()
    print(
        f"{args.model} first layer {tuple(model.first.weight.shape)} on {image_shape} images, batch {args.batch_size}, "
        f"{args.repeats} timed steps of each kind, {torch.get_num_threads()} threads, "
        f"load average {load_before[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    results = []
    for family in args.families:
        print(f"  {family} ...", flush=True)
        result = benchmark_family(family, model, images, labels, optimizer, args)
        result["verdicts"] = verdicts(result)
        results.append(result)
    load_after = os.getloadavg()
    print()
    print_table(results)
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after: timings on a shared CPU are noisy")
    if args.out:
        environment = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        }
        settings = {"families": args.families, "repeats": args.repeats, "batch_size": args.batch_size, "seed": args.seed,
                    "model": args.model, "image_shape": image_shape}
        atomic_write_json(args.out, {"environment": environment, "settings": settings, "results": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
