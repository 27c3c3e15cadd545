"""Re-run the experiments behind the README's result tables and print them as Markdown.

    python -m benchmarks.tables pneumonia strategies cifar-cnn cifar-vgg16 --data ../shared/data --out runs/tables

Each experiment is one `python -m simulation.run ... --baseline` command line (printed before it runs), so every
number in a table can be reproduced alone. A finished experiment (its metrics.json exists) is not run again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path


def suites(data: Path) -> dict[str, list[tuple[str, list[str]]]]:
    pneumonia = ["--dataset", f"npz:{data / 'pneumoniamnist.npz'}", "--holders", "10", "--model", "cnn"]
    cifar = ["--dataset", f"npz:{data / 'cifar10-subset.npz'}", "--holders", "10"]
    return {
        "pneumonia": [
            ("PneumoniaMNIST, cnn, Dirichlet 0.5", pneumonia + ["--config", "configs/pneumonia.toml"]),
        ],
        "strategies": [
            (name, pneumonia + ["--partition", "dirichlet:0.3", "--rounds", "10", "--local-epochs", "2",
                                "--lr", "0.02", "--strategy", name])
            for name in ("fedavg", "fedprox", "fedadam", "fedmedian")
        ],
        "cifar-cnn": [("CIFAR-10 subset, cnn", cifar + ["--model", "cnn", "--rounds", "10"])],
        "cifar-vgg16": [("CIFAR-10 subset, VGG-16 (BN)", cifar + ["--model", "vgg16_bn", "--rounds", "3", "--lr", "0.05",
                                                            "--batch-size", "64", "--pretrain-epochs", "2"])],
    }


def run(label: str, args: list[str], out: Path) -> dict:
    metrics = out / "metrics.json"
    if not metrics.exists():
        command = [sys.executable, "-m", "simulation.run", *args, "--baseline", "--holder-seed", "0", "--out", str(out)]
        print("$", shlex.join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    return json.loads(metrics.read_text())


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| experiment | rounds | MpLe accuracy | baseline accuracy | difference (pp) | first-round loss rel. diff |",
             "|---|---|---|---|---|---|"]
    for label, metrics in rows:
        final = metrics["final"]
        lines.append(
            f"| {label} | {final['rounds']} | {final['accuracy']:.4f} | {final['baseline_accuracy']:.4f} | "
            f"{final['difference_pp']:+.2f} | {final.get('first_round_loss_relative_difference', float('nan')):.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="+", help="pneumonia, strategies, cifar-cnn, cifar-vgg16")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with the .npz files")
    parser.add_argument("--out", type=Path, default=Path("runs/tables"), help="where the run folders go")
    args = parser.parse_args(argv)
    available = suites(args.data.resolve())
    unknown = [name for name in args.suites if name not in available]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {sorted(available)}")
    for name in args.suites:
        rows = [(label, run(label, command, args.out / name / label.split(",")[0].replace(" ", "-").lower()))
                for label, command in available[name]]
        print(f"\n### {name}\n\n{table(rows)}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
