"""The ServerApp: forms the first layer (phase 0, once per run folder), then runs one variant's rounds
(server.rounds) with any Message-API strategy on the shared backbone, and writes the variant's metrics."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.audit import AuditGrid
from server.checkpoint import Checkpoints
from server.first_layer import form_first_layer, load_first_layer
from server.plan import RunPlan, plan_run
from server.rounds import RoundLoop
from simulation.config import ExperimentConfig, build_config
from simulation.errors import UsageError
from simulation.files import atomic_torch_save, atomic_write_json
from simulation.profile import timed
from simulation.protocol import VARIANTS
from simulation.run_folder import FIRST_LAYER_FILE, FIRST_LAYER_SUMMARY, METRICS_FILE, prepare_run_dir
from strategies.registry import describe_strategy

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerSettings:
    config: ExperimentConfig
    run_dir: Path
    variant: str = "mple"
    progress: Callable[[str], None] = field(default=print)
    stop_after_round: int | None = None  # for tests of resume: exit as if killed after this round
    result: dict | None = None
    error: BaseException | None = None


def first_layer_of_run(plan: RunPlan, run_dir: Path, progress=print) -> dict:
    """Phase 0 once per run folder: form C (and the initial backbone) and keep it in first_layer.pt, so that the
    baseline and a resumed run use the same; later calls load it. Returns how C was formed."""
    path = run_dir / FIRST_LAYER_FILE
    if path.exists():
        load_first_layer(path, plan.model)
        plan.model.first.requires_grad_(False)
        return json.loads((run_dir / FIRST_LAYER_SUMMARY).read_text())
    summary = form_first_layer(plan.config, plan.placement, plan.model, progress)
    atomic_torch_save({"first": plan.model.first.state_dict(), "backbone": plan.model.backbone.state_dict()}, path)
    atomic_write_json(run_dir / FIRST_LAYER_SUMMARY, summary)
    return summary


class VariantRun:
    """One variant end to end on the server: the plan, phase 0, the rounds, metrics.json."""

    def __init__(self, grid: Grid, settings: ServerSettings):
        self.settings = settings
        with timed("server", "plan and phase 0"):
            self.plan = plan_run(settings.config)
            self.phase0 = first_layer_of_run(self.plan, settings.run_dir, settings.progress)
        self.out = settings.run_dir / settings.variant
        self.out.mkdir(parents=True, exist_ok=True)
        self.loop = RoundLoop(AuditGrid(grid, self.plan.shared), self.plan, self.plan.model.first, settings.variant,
                              Checkpoints(self.out), progress=settings.progress,
                              stop_after_round=settings.stop_after_round)

    def run(self) -> dict:
        result = self.loop.run()
        metrics = {"variant": self.settings.variant, "phase0": self.phase0,
                   "strategy": describe_strategy(self.loop.strategy), **result}
        atomic_write_json(self.out / METRICS_FILE, metrics)
        return metrics


def build_server_app(settings: ServerSettings) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            settings.result = VariantRun(grid, settings).run()
        except BaseException as error:
            settings.error = error
            raise

    return app


def settings_from_run_config(context: Context) -> ServerSettings:
    """`flwr run .`: the run config in pyproject.toml (or --run-config) names a preset (relative paths resolve
    against the project), a run folder ("" = a new one under runs/), the variant, and overrides of any setting;
    "" means "not given"."""
    run_config = {key: value for key, value in context.run_config.items() if value != ""}
    preset = run_config.pop("preset", None)
    if preset is not None and not Path(preset).expanduser().is_absolute() and not Path(preset).exists():
        preset = PROJECT_ROOT / preset
    out = run_config.pop("out", None)
    variant = run_config.pop("variant", "mple")
    if variant not in VARIANTS:
        raise UsageError(f"run config variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    overrides = {key.replace("-", "_"): value for key, value in run_config.items()}
    config = build_config(overrides, preset)
    run_dir = prepare_run_dir(config, Path(out) if out else None, exist_ok=out is not None)
    return ServerSettings(config=config, run_dir=run_dir, variant=variant)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = settings_from_run_config(context)
    metrics = VariantRun(grid, settings).run()
    final = metrics["final"]
    accuracy = "-" if final["accuracy"] is None else f"{final['accuracy']:.4f}"
    settings.progress(f"final test accuracy (official test split, mean over holders) {accuracy}; "
                      f"results: {settings.run_dir / settings.variant}")
