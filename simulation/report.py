"""The run folder a person reads: metrics.json/.csv, curves.png, class counts and the holders' key summary."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from clients.holder import KEY_FILE, holder_home
from clients.keys import HolderKey
from clients.secrets import SECRETS_FILE, HolderSecrets, channel_order
from server.first_layer import initial_model, load_first_layer
from simulation.config import ExperimentConfig
from simulation.data import class_counts, plot_class_counts
from simulation.files import atomic_write_json, atomic_write_text
from simulation.key_table import compare_keys, format_key_table, write_key_report
from simulation.placement import placement_for
from simulation.run_folder import FIRST_LAYER_FILE

CSV_COLUMNS = ("variant", "round", "train_loss", "train_accuracy", "loss", "accuracy", "holders_trained",
               "holders_evaluated", "train_failures", "evaluate_failures", "counted", "dp_epsilon", "seconds")


def write_setup(config: ExperimentConfig, run_dir: Path) -> None:
    """Per-holder class counts (JSON and a bar chart), written before training starts."""
    placement = placement_for(config)
    dataset = placement.dataset
    parts = [np.concatenate([train, test]) for train, test in zip(placement.holder_train, placement.holder_test)]
    counts = class_counts(dataset.train.labels, parts, dataset.num_classes)
    atomic_write_json(run_dir / "class_counts.json", {
        "class_names": list(dataset.class_names),
        "public": int(len(placement.public)),
        "holders": {str(i): row.tolist() for i, row in enumerate(counts)},
    })
    plot_class_counts(counts, dataset.class_names, run_dir / "class_counts.png", scheme=config.partition)


def write_report(config: ExperimentConfig, run_dir: Path, results: dict[str, dict], *, progress=print) -> dict:
    mple = results["mple"]
    final = dict(mple["final"])
    summary = {"rounds": mple["rounds"], "final": final, "phase0": mple["phase0"], "strategy": mple["strategy"]}
    if "baseline" in results:
        baseline = results["baseline"]
        summary["baseline"] = {"rounds": baseline["rounds"], "final": baseline["final"]}
        final["baseline_accuracy"] = baseline["final"]["accuracy"]
        final["difference_pp"] = 100 * (final["accuracy"] - final["baseline_accuracy"])
        first, first_base = final.get("first_round_train_loss"), baseline["final"].get("first_round_train_loss")
        if first is not None and first_base:
            final["first_round_loss_relative_difference"] = abs(first - first_base) / abs(first_base)
    summary["keys"] = [
        {name: row[name] for name in ("holder", "fingerprint", "family", "block_size", "entries", "worst_condition")}
        for row in write_key_summary(config, run_dir, progress=progress)
    ]
    atomic_write_json(run_dir / "metrics.json", summary)
    atomic_write_text(run_dir / "metrics.csv", _csv(results))
    plot_curves(results, run_dir / "curves.png")
    progress(_final_text(final))
    return summary


KEY_REPORT_HOLDERS = 20


def write_key_summary(config: ExperimentConfig, run_dir: Path, *, progress=print) -> list[dict]:
    """The key comparison (simulation.key_table) for the run's holders, from the keys and secrets in their own
    folders: a table on the terminal, keys.json, morph.png and keys.png, never the keys themselves. In a simulation the
    launcher runs this on the holders' side of the run folder (holders/), after the federation has ended; the
    ServerApp never reads those folders."""
    placement = placement_for(config)
    dataset = placement.dataset
    holders = [h for h in range(config.holders) if (holder_home(run_dir, h) / KEY_FILE).exists()]
    shown = holders[:KEY_REPORT_HOLDERS]
    if not shown:
        return []
    keys = [HolderKey.load(holder_home(run_dir, h) / KEY_FILE) for h in shown]
    model = initial_model(config, placement)
    load_first_layer(run_dir / FIRST_LAYER_FILE, model)
    orders = [channel_order(HolderSecrets.load(holder_home(run_dir, h) / SECRETS_FILE), config.shuffle,
                            model.first.out_channels).tolist() for h in shown]
    samples = dataset.test.images[: max(64, 8 + (keys[0].block_size if config.key_family == "blocks" else 1))]
    rows = compare_keys(keys, model.first, samples, mean=dataset.mean, std=dataset.std, order=orders,
                        backbone=model.backbone, timing_repeats=3, timing_max_repeats=10, timing_seconds=3, known_plaintext=config.key_family != "dense",
                        sample_images="official test images",
                        attack_images=np.concatenate([dataset.train.images[:500], dataset.test.images[-500:]]))
    for row, holder in zip(rows, shown):
        row["holder"] = holder
        if "attack_holder" in row:
            row["attack_holder"] = shown[row["attack_holder"]]
    context = {"dataset": config.dataset, "model": config.model, "holders_shown": len(shown),
               "holders_with_keys": len(holders), "note": "" if len(shown) == len(holders) else
               f"the first {len(shown)} of {len(holders)} holders"}
    write_key_report(rows, run_dir, keys, samples, mean=dataset.mean, std=dataset.std, context=context)
    progress("per-holder keys" + (f" ({context['note']})" if context["note"] else "") + ":\n" + format_key_table(rows))
    return rows


def _csv(results: dict[str, dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for variant, metrics in results.items():
        for row in metrics["rounds"]:
            writer.writerow({"variant": variant, **row})
    return buffer.getvalue()


CURVE_METRICS = (  # (panel, row key, label, colour): one colour per metric in the whole figure
    ("loss", "train_loss", "train loss (holders' training batches)", "tab:blue"),
    ("loss", "loss", "eval loss (holders' own test splits)", "tab:orange"),
    ("accuracy", "accuracy", "federated eval accuracy (holders' own test splits)", "tab:green"),
)
VARIANT_STYLES = {  # one line style per variant; the baseline's open, larger markers keep a coinciding line visible
    "mple": {"label": "MpLe", "linestyle": "-", "marker": "o", "markersize": 4, "linewidth": 1.6},
    "baseline": {"label": "baseline (no morphing)", "linestyle": "--", "marker": "s", "markersize": 8,
                 "linewidth": 1.0, "markerfacecolor": "none"},
}


def plot_curves(results: dict[str, dict], path: Path) -> None:
    """Loss and accuracy per round: a colour per metric, a line style per variant, whole-number rounds, and the final
    accuracy on the official test split beside the federated one (they are measured on different images)."""
    private = any(row.get("dp_epsilon") is not None for metrics in results.values() for row in metrics["rounds"])
    panels = ("loss", "accuracy", "privacy") if private else ("loss", "accuracy")
    from matplotlib.figure import Figure  # here, so that a command pays for matplotlib only when it plots
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = dict(zip(panels, figure.subplots(1, len(panels))))
    for variant, metrics in results.items():
        style = VARIANT_STYLES[variant]
        rows = metrics["rounds"]
        for panel, key, label, colour in CURVE_METRICS:
            points = [(row["round"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                axes[panel].plot(*zip(*points), color=colour, **{**style, "label": f"{style['label']}: {label}"})
        final = metrics["final"].get("accuracy")
        if final is not None and rows:
            axes["accuracy"].plot([rows[-1]["round"]], [final], color="tab:red", linestyle="none",
                                  marker="*" if variant == "mple" else "P", markersize=12 if variant == "mple" else 9,
                                  label=f"{style['label']}: final accuracy, official test split ({final:.3f})")
    if private:
        _plot_epsilon(axes["privacy"], results)
    coincide = "mple" in results and "baseline" in results and _curves_coincide(results["mple"], results["baseline"])
    note = " — MpLe and baseline coincide (AugConv is exact): dashed baseline over solid MpLe" if coincide else ""
    axes["loss"].set(title="Loss per round", xlabel="round", ylabel="cross-entropy")
    axes["accuracy"].set(title="Accuracy per round", xlabel="round", ylabel="accuracy")
    for panel in axes.values():
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7)
    figure.suptitle(f"Federated training{note}", fontsize=10)
    figure.savefig(path, dpi=110)


def _plot_epsilon(panel, results: dict[str, dict]) -> None:
    """--dp holder: each holder's spent epsilon after each round it trained (thin), and the largest so far."""
    for variant, metrics in results.items():
        style = VARIANT_STYLES[variant]
        rows = metrics["rounds"]
        spent: dict[str, list] = {}
        for row in rows:
            for holder, values in row.get("per_holder", {}).items():
                if values.get("dp_epsilon") is not None:
                    spent.setdefault(holder, []).append((row["round"], values["dp_epsilon"]))
        for index, points in enumerate(spent.values()):
            panel.plot(*zip(*points), color="tab:gray", alpha=0.4, linewidth=0.7, linestyle=style["linestyle"],
                       label=f"{style['label']}: each holder" if index == 0 else None)
        points = [(row["round"], row["dp_epsilon"]) for row in rows if row.get("dp_epsilon") is not None]
        if points:
            panel.plot(*zip(*points), color="tab:purple", **{**style, "label": f"{style['label']}: largest epsilon"})
    delta = next(iter(results.values()))["final"].get("dp_delta")
    panel.set(title=f"Privacy spent (DP-SGD, delta = {delta:g})" if delta else "Privacy spent (DP-SGD)",
              xlabel="round", ylabel="epsilon")


def _curves_coincide(first: dict, second: dict, tolerance: float = 1e-2) -> bool:
    for a, b in zip(first["rounds"], second["rounds"]):
        for _, key, _, _ in CURVE_METRICS:
            x, y = a.get(key), b.get(key)
            if (x is None) != (y is None) or (x is not None and abs(x - y) > tolerance * max(abs(y), 1e-12)):
                return False
    return len(first["rounds"]) == len(second["rounds"])


def _final_text(final: dict) -> str:
    text = f"final test accuracy (official test split, mean over holders): {final['accuracy']:.4f}"
    if final.get("dp_epsilon") is not None:
        text += f" at epsilon {final['dp_epsilon']:.2f} (delta {final['dp_delta']:g}, the largest holder's)"
    if "baseline_accuracy" in final:
        text += (f"; baseline {final['baseline_accuracy']:.4f}; difference {final['difference_pp']:+.2f} pp; "
                 f"first-round loss relative difference {final.get('first_round_loss_relative_difference', float('nan')):.2e}")
    return text


def load_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())
