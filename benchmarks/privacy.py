"""Re-run the attacks behind docs/privacy.md's tables and print them as Markdown.

    python -m benchmarks.privacy gradient ciphertext --data ../shared/data --out results/privacy

Each cell is one attack command (printed before it runs, and in the table), so every figure can be reproduced
alone. A finished command (its JSON exists) is not run again. Keys come from ``--holder-seed 0``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from server.attacks.common import rate_text

GRADIENT_SCENARIOS = {
    "plain FL (baseline), --shuffle federation": ["--variant", "baseline", "--shuffle", "federation"],
    "MpLe, --shuffle federation": ["--variant", "mple", "--shuffle", "federation"],
    "MpLe, --shuffle holder": ["--variant", "mple", "--shuffle", "holder"],
    "MpLe, --local-layers classifier": ["--variant", "mple", "--shuffle", "federation", "--local-layers", "classifier"],
    "MpLe, --dp client, noise 0.01": ["--variant", "mple", "--shuffle", "federation", "--dp", "client", "--dp-noise", "0.01"],
    "MpLe, --dp client, noise 0.1": ["--variant", "mple", "--shuffle", "federation", "--dp", "client", "--dp-noise", "0.1"],
}
GRADIENT_ROUNDS = [(1, 1), (4, 1), (16, 1), (1, 4), (4, 4), (16, 4)]  # (batch size, local steps); 4 steps: an epoch
GRADIENT_LARGEST_FOR = ("plain FL (baseline), --shuffle federation", "MpLe, --shuffle federation")  # 16 x 4: minutes each
CIPHERTEXT_KEYS = [("repeated", 1), ("repeated", 2), ("repeated", 4), ("blocks", 1), ("dense", None)]  # q: width / divisor


def gradient_cells(data: Path, iterations: int, restarts: int) -> list[tuple[str, str, str, list[str]]]:
    dataset = ["--dataset", f"npz:{data / 'pneumoniamnist.npz'}", "--holder-seed", "0", "--seed", "0",
               "--iterations", str(iterations), "--restarts", str(restarts)]
    cells = []
    for label, flags in GRADIENT_SCENARIOS.items():
        for batch, steps in GRADIENT_ROUNDS:
            if (batch, steps) == GRADIENT_ROUNDS[-1] and label not in GRADIENT_LARGEST_FOR:
                continue
            name = f"gi-{_slug(label)}-b{batch}-k{steps}"
            cells.append(("gradient_inversion", name, f"{label} | {batch} x {steps}",
                          [*dataset, *flags, "--batch-size", str(batch), "--local-steps", str(steps)]))
    return cells


def ciphertext_cells(data: Path) -> list[tuple[str, str, str, list[str]]]:
    cells = []
    for dataset_label, spec, width in (("PneumoniaMNIST", f"npz:{data / 'pneumoniamnist.npz'}", 28),
                                       ("CIFAR-10 subset", f"npz:{data / 'cifar10-subset.npz'}", 32)):
        for family, divisor in CIPHERTEXT_KEYS:
            q = None if divisor is None else width // divisor
            flags = ["--dataset", spec, "--key-family", family, "--holder-seed", "0", "--seed", "0",
                     "--holder-images", "100,300,1000", "--public-images", "100,300,1000"]
            if q is not None:
                flags += ["--block-size", str(q)]
            name = f"co-{_slug(dataset_label)}-{family}-q{q or 'default'}"
            cells.append(("ciphertext_only", name, f"{dataset_label} | {family} | {q or 'default'}", flags))
    return cells


def run(attack: str, name: str, flags: list[str], out: Path) -> dict:
    folder = out / name
    result = folder / f"{attack}.json"
    if not result.exists():
        command = [sys.executable, "-m", f"server.attacks.{attack}", *flags, "--out", str(folder)]
        print("$", shlex.join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    figures = json.loads(result.read_text())
    settings = figures.get("attack_settings", {})
    for flag, name in (("--iterations", "iterations"), ("--restarts", "restarts")):
        if flag in flags and settings.get(name) != int(flags[flags.index(flag) + 1]):
            raise SystemExit(f"error: {result} was made with {name} {settings.get(name)}, not {flags[flags.index(flag) + 1]}; "
                             "give another --out or remove that folder")
    return figures


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def gradient_table(results: list[tuple[str, dict]]) -> list[str]:
    """One row per configuration and view, one column per (batch size, local steps): the residual correlation, and
    for batches the re-identification rate over its chance level."""
    columns = [f"{batch} x {steps}" for batch, steps in GRADIENT_ROUNDS]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for label, result in results:
        configuration, rounds = label.split(" | ")
        for view, figures in result["views"].items():
            rate = "" if figures["reidentification"] is None else f" ({figures['reidentification']:.2f}/{figures['chance']:.2f})"
            cells.setdefault((configuration, view), {})[rounds] = f"{figures['residual_correlation']:.2f}{rate}"
    lines = ["| configuration | view | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (configuration, view), row in cells.items():
        lines.append(f"| {configuration} | {view} | " + " | ".join(row.get(column, "") for column in columns) + " |")
    return lines


def ciphertext_table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| dataset | family | q | SSIM (null) | corr (null) | residual corr | re-id (chance) | identity guess: residual corr "
             "| residual corr by morphed images 100 / 300 (1000 public) | by public images 100 / 300 (1000 morphed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, result in results:
        curve = {(p["holder_images"], p["public_images"]): p["residual_correlation"] for p in result["curve"]}
        most_holder, most_public = result["holder_images"], result["public_images"]
        by_holder = " / ".join(f"{curve[(h, most_public)]:.2f}" for h in sorted(h for h, p in curve if p == most_public and h != most_holder))
        by_public = " / ".join(f"{curve[(most_holder, p)]:.2f}" for p in sorted(p for h, p in curve if h == most_holder and p != most_public))
        lines.append(f"| {label} | {result['ssim']:.2f} ({result['null_ssim']:.2f}) | {result['correlation']:.2f} "
                     f"({result['null_correlation']:.2f}) | **{result['residual_correlation']:.2f}** | "
                     f"{rate_text(result['reidentification'])} ({result['chance']:.3f}) | "
                     f"{result['identity_guess']['residual_correlation']:.2f} | {by_holder} | {by_public} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="+", choices=("gradient", "ciphertext"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with the npz files")
    parser.add_argument("--out", type=Path, default=Path("results/privacy"), help="one subfolder per command")
    parser.add_argument("--iterations", type=int, default=500, help="gradient inversion: Adam iterations per restart")
    parser.add_argument("--restarts", type=int, default=1, help="gradient inversion: restarts")
    args = parser.parse_args(argv)
    for suite in args.suites:
        cells = gradient_cells(args.data, args.iterations, args.restarts) if suite == "gradient" else ciphertext_cells(args.data)
        results = [(label, run(attack, name, flags, args.out)) for attack, name, label, flags in cells]
        table = gradient_table(results) if suite == "gradient" else ciphertext_table(results)
        print("\n".join(table))
        (args.out / f"{suite}.md").write_text("\n".join(table) + "\n")
        print("commands: python -m server.attacks.<attack> with the flags above; each cell's folder:", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
