"""Re-run the attacks behind docs/privacy.md's tables and print them as Markdown.

    python -m benchmarks.privacy known reversing leakage cross gradient ciphertext --data ../shared/data --out results/privacy

Each cell is one attack command (printed before it runs, and in the table), so every figure can be reproduced
alone. A finished command (its JSON exists) is not run again. Keys come from ``--holder-seed 0``. The attacks that
use the first layer C (reversing, feature leakage, cross-key) take the ``first_layer.pt`` of a run's phase 0
(``simulation.run`` with 3 pretraining epochs on the public half of the training images), made once per dataset.
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
DATASETS = {"PneumoniaMNIST": "pneumoniamnist.npz", "CIFAR-10 subset": "cifar10-subset.npz"}
FAMILIES = ("repeated", "blocks", "dense")
CROSS_KEY_CELLS = [("CIFAR-10 subset", "repeated"), ("PneumoniaMNIST", "repeated"), ("PneumoniaMNIST", "dense")]
CIPHERTEXT_KEYS = [("repeated", 1), ("repeated", 2), ("repeated", 4), ("blocks", 1), ("dense", None)]  # q: width / divisor


def gradient_cells(args: argparse.Namespace) -> list[tuple[str, str, str, list[str]]]:
    dataset = [*_dataset_flags(args.data, "PneumoniaMNIST"), "--iterations", str(args.iterations), "--restarts", str(args.restarts)]
    cells = []
    for label, flags in GRADIENT_SCENARIOS.items():
        for batch, steps in GRADIENT_ROUNDS:
            if (batch, steps) == GRADIENT_ROUNDS[-1] and label not in GRADIENT_LARGEST_FOR:
                continue
            name = f"gi-{_slug(label)}-b{batch}-k{steps}"
            cells.append(("gradient_inversion", name, f"{label} | {batch} x {steps}",
                          [*dataset, *flags, "--batch-size", str(batch), "--local-steps", str(steps)]))
    return cells


def ciphertext_cells(args: argparse.Namespace) -> list[tuple[str, str, str, list[str]]]:
    cells = []
    for dataset_label, width in (("PneumoniaMNIST", 28), ("CIFAR-10 subset", 32)):
        for family, divisor in CIPHERTEXT_KEYS:
            q = None if divisor is None else width // divisor
            flags = [*_dataset_flags(args.data, dataset_label), "--key-family", family,
                     "--holder-images", "100,300,1000", "--public-images", "100,300,1000"]
            if q is not None:
                flags += ["--block-size", str(q)]
            name = f"co-{_slug(dataset_label)}-{family}-q{q or 'default'}"
            cells.append(("ciphertext_only", name, f"{dataset_label} | {family} | {q or 'default'}", flags))
    return cells


def first_layer(args: argparse.Namespace, dataset_label: str) -> Path:
    """A run's phase-0 first layer for `dataset_label` (made by `simulation.run` when it is not there yet)."""
    folder = args.out / f"first-layer-{_slug(dataset_label)}"
    path = folder / "first_layer.pt"
    return _made_once(path, ["simulation.run", "--dataset", f"npz:{args.data / DATASETS[dataset_label]}", "--holders",
                             "2", "--rounds", "1", "--public-fraction", "0.5", "--pretrain-epochs", "3", "--holder-seed",
                             "0", "--seed", "0", "--out", str(folder)])


def _made_once(result: Path, module_argv: list[str]) -> Path:
    """`result`, running `python -m <module_argv>` (printed first) when it is not there yet."""
    if not result.exists():
        print("$ -m", shlex.join(module_argv), flush=True)
        subprocess.run([sys.executable, "-m", *module_argv], check=True)
    return result


def first_layer_summary(args: argparse.Namespace) -> list[str]:
    lines = ["| dataset | first layer (command) | pretraining accuracy (public images) | run's test accuracy |", "|---|---|---|---|"]
    for label in DATASETS:
        path = first_layer(args, label)
        metrics = json.loads((path.parent / "metrics.json").read_text())
        lines.append(f"| {label} | `{path}` | {metrics['phase0']['accuracy']:.3f} ({metrics['phase0']['public_images']}) | "
                     f"{metrics['final']['accuracy']:.3f} |")
    return lines


def _dataset_flags(data: Path, dataset_label: str) -> list[str]:
    return ["--dataset", f"npz:{data / DATASETS[dataset_label]}", "--holder-seed", "0", "--seed", "0"]


def known_cells(args: argparse.Namespace) -> list[tuple[str, str, str, list[str]]]:
    return [("known_plaintext", f"kp-{_slug(label)}-{family}", f"{label} | {family}",
             [*_dataset_flags(args.data, label), "--key-family", family]) for label in DATASETS for family in FAMILIES]


def reversing_cells(args: argparse.Namespace) -> list[tuple[str, str, str, list[str]]]:
    return [("reversing", f"rev-{_slug(label)}-{family}", f"{label} | {family}",
             [*_dataset_flags(args.data, label), "--key-family", family, "--first-layer", str(first_layer(args, label))])
            for label in DATASETS for family in FAMILIES]


def leakage_cells(args: argparse.Namespace) -> list[tuple[str, str, str, list[str]]]:
    cells = []
    for label in DATASETS:
        pretrained = ["--first-layer", str(first_layer(args, label))]
        for layer, flags in (("pretrained", pretrained), ("random", [])):
            cells.append(("feature_leakage", f"fl-{_slug(label)}-{layer}", f"{label} | {layer}",
                          [*_dataset_flags(args.data, label), *flags]))
    return cells


def cross_cells(args: argparse.Namespace) -> list[tuple[str, str, str, list[str]]]:
    return [("cross_key", f"ck-{_slug(label)}-{family}", f"{label} | {family}",
             [*_dataset_flags(args.data, label), "--key-family", family, "--first-layer", str(first_layer(args, label)),
              "--epochs", "3"]) for label, family in CROSS_KEY_CELLS]


def run(attack: str, name: str, flags: list[str], out: Path) -> dict:
    folder = out / name
    result = _made_once(folder / f"{attack}.json", [f"server.attacks.{attack}", *flags, "--out", str(folder)])
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


def known_table(results: list[tuple[str, dict]]) -> list[str]:
    """Per dataset, one row per count of known pairs and one column per family: PSNR / SSIM / residual correlation
    (re-identification), bold where the known pairs reach the key's full rank; the null guess last."""
    lines = []
    for dataset in DATASETS:
        curves = {label.split(" | ")[1]: result for label, result in results if label.startswith(dataset + " |")}
        counts = sorted({point["known_images"] for result in curves.values() for point in result["curve"]})
        lines += [f"{dataset} (32 decrypted images; PSNR dB / SSIM / residual corr (re-id)):", "",
                  "| k | " + " | ".join(f"{family} (needs {curves[family]['known_images_needed']})" for family in curves) + " |",
                  "|---|" + "---|" * len(curves)]
        for count in counts:
            row = []
            for result in curves.values():
                point = next((p for p in result["curve"] if p["known_images"] == count), None)
                text = "" if point is None else (f"{min(point['psnr_db'], 150):.1f} / {point['ssim']:.3f} / "
                                                 f"{point['residual_correlation']:.2f} ({rate_text(point['reidentification'])})")
                row.append(f"**{text}**" if point is not None and point["rank"] >= result["full_rank"] else text)
            lines.append(f"| {count} | " + " | ".join(row) + " |")
        null = next(iter(curves.values()))["curve"][0]
        lines += [f"| null guess | {null['null_psnr_db']:.1f} / {null['null_ssim']:.3f} / 0 (chance {null['chance']:.3f}) |"
                  + " |" * (len(curves) - 1), ""]
    return lines


def reversing_table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| dataset | family | order recovered | order from the bias alone | `M^-1` relative error | PSNR / SSIM "
             "(null) | residual corr | re-id (chance) | time |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results:
        bias = "n/a" if r["bias_reveals_order"] is None else ("yes" if r["bias_reveals_order"] else "no")
        lines.append(f"| {label} | {'yes' if r['order_recovered'] else 'no'} ({r['channels_matched']}/{r['channels']}) | "
                     f"{bias} | {r['inverse_matrix_error']:.1e} | {min(r['psnr_db'], 150):.1f} dB / {r['ssim']:.3f} "
                     f"({r['null_psnr_db']:.1f} dB / {r['null_ssim']:.3f}) | {r['residual_correlation']:.2f} | "
                     f"{rate_text(r['reidentification'])} ({r['chance']:.3f}) | {r['seconds']:.1f} s |")
    return lines


def leakage_table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| dataset | first layer | best channel SSIM | all channels SSIM | best channel abs. correlation | "
             "all channels abs. correlation |", "|---|---|---|---|---|---|"]
    for label, r in results:
        lines.append(f"| {label} | {r['best_channel_ssim_mean']:.2f} | {r['channel_ssim_mean']:.2f} | "
                     f"{r['best_abs_correlation_mean']:.2f} | {r['abs_correlation_mean']:.2f} |")
    return lines


def cross_table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| dataset | family | own key (mean) | other key (mean, max) | most common class |", "|---|---|---|---|---|"]
    for label, r in results:
        lines.append(f"| {label} | {r['own_key_mean']:.3f} | {r['other_key_mean']:.3f}, {r['other_key_max']:.3f} | "
                     f"{r['chance']:.3f} |")
    return lines


SUITES = {
    "known": (known_cells, known_table),
    "reversing": (reversing_cells, reversing_table),
    "leakage": (leakage_cells, leakage_table),
    "cross": (cross_cells, cross_table),
    "gradient": (gradient_cells, gradient_table),
    "ciphertext": (ciphertext_cells, ciphertext_table),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="+", choices=tuple(SUITES))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with the npz files")
    parser.add_argument("--out", type=Path, default=Path("results/privacy"), help="one subfolder per command")
    parser.add_argument("--iterations", type=int, default=500, help="gradient inversion: Adam iterations per restart")
    parser.add_argument("--restarts", type=int, default=1, help="gradient inversion: restarts")
    args = parser.parse_args(argv)
    for suite in args.suites:
        make_cells, make_table = SUITES[suite]
        cells = make_cells(args)
        results = [(label, run(attack, name, flags, args.out)) for attack, name, label, flags in cells]
        table = make_table(results)
        if suite in ("reversing", "leakage", "cross"):
            table = [*first_layer_summary(args), "", *table]
        print("\n".join(table))
        (args.out / f"{suite}.md").write_text("\n".join(table) + "\n")
        print("commands: python -m server.attacks.<attack> with the flags above; each cell's folder:", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
