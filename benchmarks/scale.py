"""How a simulation scales with the number of data holders: wall time per phase and round, and peak memory.

Each size is one real `python -m simulation.run` on Flower's Ray engine (the command line is printed before it runs).
Memory is the peak of the summed resident set size (RSS) of that process and all its descendants (Ray's GCS, raylet
and worker processes), sampled every --sample-interval seconds from /proc (Linux). Shared pages (torch's libraries,
Ray's object store) count once per process, so the sum overstates what the machine really uses.

    python -m benchmarks.scale --holders 10,100,1000 --out runs/scale

Digits has 1,438 training images (1,797 less the 20% official test split), too few for 1,000 holders with at least
two images each: a size that does not fit is reported with the run's one-line error. Give a larger dataset for
those, e.g. --dataset npz:../shared/data/pneumoniamnist.npz (4,708 training images).

Before the runs it times one holder's first-time setup (key generation, AugConv build and the owner-only files)
against loading a holder back from its folder (what a holder cache miss costs), and the size of a training message.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python benchmarks/scale.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clients.holder import Holder
from clients.secrets import holder_secrets
from server.first_layer import initial_model
from server.plan import shared_backbone_names
from simulation.config import build_config
from simulation.errors import UsageError
from simulation.placement import placement_for
from simulation.protocol import HolderSettings

GIB = 2**30
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ memory
def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may contain spaces
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def tree_rss_bytes(root: int) -> tuple[int, int]:
    """(summed RSS in bytes, number of processes) of `root`'s process tree."""
    total, count = 0, 0
    for pid in process_tree(root):
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * PAGE_BYTES
        count += 1
    return total, count


class PeakMemory:
    """Samples a process tree's summed RSS in a thread; `peak` and `processes` (at the peak) once stopped."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.peak, self.processes = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total, count = tree_rss_bytes(self.pid)
            if total > self.peak:
                self.peak, self.processes = total, count
            self._stop.wait(self.interval)


# ------------------------------------------------------------------------------------------ one run
def run_size(holders: int, args: argparse.Namespace, out: Path) -> dict:
    """One real run; returns its phases (seconds), per-round seconds and peak memory, or the error of a misfit."""
    command = [
        sys.executable, "-m", "simulation.run", "--holders", str(holders), "--rounds", str(args.rounds),
        "--fraction-train", str(args.fraction), "--fraction-evaluate", str(args.fraction),
        "--dataset", args.dataset, "--model", args.model, "--public-fraction", str(args.public_fraction),
        "--test-fraction", str(args.test_fraction), "--pretrain-epochs", str(args.pretrain_epochs),
        "--seed", str(args.seed), "--out", str(out), *shlex.split(args.extra),
    ]  # fmt: skip
    print("$ " + shlex.join(command), flush=True)
    log = out.with_suffix(".log")
    started = time.monotonic()
    marks: dict[str, float] = {}
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with PeakMemory(process.pid, args.sample_interval) as memory:
            for line in process.stdout:
                log_file.write(line)
                now = time.monotonic() - started
                if line.startswith("run folder:"):
                    marks["checked"] = now
                if line.startswith(f"round {1:>3}/"):
                    marks["round 1 done"] = now
                if line.startswith(f"round {args.rounds:>3}/"):
                    marks["rounds done"] = now
                if line.startswith("final test accuracy"):
                    marks["reported"] = now
            code = process.wait()
    wall = time.monotonic() - started
    result = {"holders": holders, "wall_s": round(wall, 1), "peak_rss_gib": round(memory.peak / GIB, 2),
              "processes": memory.processes, "exit_code": code, "log": str(log)}
    if code != 0:
        lines = log.read_text().strip().splitlines()
        result["error"] = lines[-1] if lines else f"exit code {code}"
        return result
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = [row["seconds"] for row in metrics["rounds"]]
    result.update(
        round_s=rounds,
        accuracy=metrics["final"]["accuracy"],
        sampled=[row["holders_trained"] + row["train_failures"] for row in metrics["rounds"]],
        # Start-up: imports, data and checks, Ray and its workers, phase 0, asking every node which holder it is.
        startup_s=round(marks["round 1 done"] - rounds[0], 1),
        # The final evaluation: every sampled holder scores the official test split; then the report files.
        final_s=round(marks["reported"] - marks["rounds done"], 1),
        # Ray and Flower shutting down.
        exit_s=round(wall - marks["reported"], 1),
    )
    return result


# ------------------------------------------------------------------------------------------ one holder
def holder_costs(args: argparse.Namespace, holders: int, repeats: int = 20) -> dict:
    """Median seconds of a holder's first-time setup and of loading it back from its folder, in this process."""
    torch.set_num_threads(1)
    config = build_config({"holders": holders, "dataset": args.dataset, "model": args.model,
                           "public_fraction": args.public_fraction, "test_fraction": args.test_fraction,
                           "seed": args.seed})  # fmt: skip
    federation = placement_for(config)
    model = initial_model(config, federation)
    settings = HolderSettings.from_config(config, "mple")
    first_setup, reload = [], []
    with tempfile.TemporaryDirectory() as folder:
        for holder in range(min(repeats, holders)):
            home = Path(folder) / f"holder-{holder:04d}"
            started = time.perf_counter()
            Holder(holder, settings, home, holder_secrets(home, holder), model.first, torch.device("cpu"))
            first_setup.append(time.perf_counter() - started)
            started = time.perf_counter()
            Holder(holder, settings, home, holder_secrets(home, holder), model.first, torch.device("cpu"))
            reload.append(time.perf_counter() - started)
        files = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()) / min(repeats, holders)
    state = model.backbone.state_dict()
    shared = shared_backbone_names(model, config)
    message = sum(state[name].numel() * state[name].element_size() for name in shared)
    message += sum(value.numel() * value.element_size() for value in model.first.state_dict().values())
    message += len(settings.to_json())
    return {
        "first_setup_ms": round(1000 * statistics.median(first_setup), 1),
        "reload_ms": round(1000 * statistics.median(reload), 1),
        "holder_files_kib": round(files / 1024, 1),
        "train_message_kib": round(message / 1024, 1),
    }


# ------------------------------------------------------------------------------------------ report
def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.dataset}, {args.model}, {args.rounds} rounds, {args.fraction:.0%} of holders sampled per round "
        f"(train and evaluate), --public-fraction {args.public_fraction}, "
        f"one Ray worker per CPU ({os.cpu_count()} CPUs)",
        "",
        "| holders | sampled/round | start-up (s) | rounds (s) | final evaluation + report (s) | shutdown (s) "
        "| total wall (s) | peak memory, summed RSS (GiB) | processes |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        if row.get("error"):
            lines.append(f"| {row['holders']} | failed: {row['error']} |||||||| ")
            continue
        rounds = " / ".join(f"{seconds:.1f}" for seconds in row["round_s"])
        lines.append(
            f"| {row['holders']} | {row['sampled'][0]} | {row['startup_s']:.1f} | {rounds} | {row['final_s']:.1f} "
            f"| {row['exit_s']:.1f} | {row['wall_s']:.1f} | {row['peak_rss_gib']:.2f} | {row['processes']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--holders", default="10,100,1000", help="comma-separated federation sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1, help="--fraction-train and --fraction-evaluate")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--public-fraction", type=float, default=0.05)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", default="", help="more simulation.run flags, quoted as one string")
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--out", type=Path, default=Path("runs/scale"), help="folder for the runs, logs and scale.json")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(item) for item in args.holders.split(",") if item.strip()]
    except ValueError:
        parser.error(f"--holders takes comma-separated integers such as 10,100,1000, got {args.holders!r}")
    if not args.sizes or min(args.sizes) < 1:
        parser.error(f"--holders takes positive integers, got {args.holders!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/statm").exists():
        print("error: benchmarks.scale reads memory from /proc; run it on Linux", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        costs = holder_costs(args, min(args.sizes))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return UsageError.exit_code
    print(f"one holder: first-time setup {costs['first_setup_ms']} ms (key, AugConv, owner-only files: "
          f"{costs['holder_files_kib']} KiB), reload from its folder {costs['reload_ms']} ms; "
          f"a training message carries {costs['train_message_kib']} KiB", flush=True)
    results = []
    for holders in args.sizes:
        out = args.out / f"holders-{holders}"
        if (out / "config.json").exists():
            shutil.rmtree(out)  # an earlier benchmark run: measured afresh
        results.append(run_size(holders, args, out))
        print(json.dumps(results[-1]), flush=True)
    report = table(results, args)
    (args.out / "scale.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                     "holder": costs, "runs": results}, indent=2) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
