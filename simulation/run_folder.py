"""The run folder's layout, and creating one without ever overwriting earlier results."""

from __future__ import annotations

import time
from pathlib import Path

from simulation.config import ExperimentConfig
from simulation.files import atomic_write_json, fresh_folder

RUN_MARKER = "config.json"  # the resolved configuration (no secrets); marks a run folder
FIRST_LAYER_FILE = "first_layer.pt"
FIRST_LAYER_SUMMARY = "first_layer.json"
CHECKPOINT_FILE = "checkpoint.pt"  # per variant: the last completed round
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.json"
HOLDERS_FOLDER = "holders"


def default_run_dir(config: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = config.dataset.split(":")[-1].replace("/", "_").rsplit(".", 1)[0]
    return Path("runs") / f"{stamp}-{name}-{config.model}-{config.key_family}"


def prepare_run_dir(config: ExperimentConfig, out: Path | None, *, exist_ok: bool = False) -> Path:
    """Create the run folder; never reuse one that holds results (unless resuming via `exist_ok`)."""
    out = fresh_folder(default_run_dir(config) if out is None else out, allow_existing=exist_ok,
                       hint="choose a new --out or --resume it", what="run folder")
    if not (out / RUN_MARKER).exists():
        atomic_write_json(out / RUN_MARKER, config.to_dict())
    return out
