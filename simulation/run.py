"""`python -m simulation.run`: a federated MpLe experiment on Flower's simulation engine (Ray), with its baseline.

Results land in a run folder: config.json, metrics.json (+ metrics.csv), curves.png, keys.json, class_counts.*,
and each holder's own (owner-only) folder under holders/.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from flwr.simulation import run_simulation

from clients.client_app import HolderSide, build_client_app
from clients.floor import SecurityFloor
from clients.secrets import provision_holders
from server.plan import plan_run
from server.server_app import ServerSettings, build_server_app
from simulation.cli import check_floor, config_from_args, floor_from_args, parse_args
from simulation.config import ExperimentConfig
from simulation.errors import UsageError
from simulation.protocol import VARIANTS
from simulation.report import write_report, write_setup
from simulation.run_folder import HOLDERS_FOLDER, METRICS_FILE, RUN_MARKER, prepare_run_dir


def _quiet_logs() -> None:
    """Flower logs every step at INFO; the run prints its own progress. Keep Flower's warnings, minus the notice
    that run_simulation will be replaced by `flwr run` (both are supported here; see README)."""

    class DropDeprecation(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "DEPRECATED FEATURE" not in record.getMessage()

    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        handler.addFilter(DropDeprecation())
    logger.addFilter(DropDeprecation())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def backend_config(config: ExperimentConfig) -> dict:
    init_args = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    if config.ray_address:
        init_args["address"] = config.ray_address
    return {
        "client_resources": {"num_cpus": config.cpus_per_holder, "num_gpus": config.gpus_per_holder},
        "init_args": init_args,
    }


def holder_side(config: ExperimentConfig, run_dir: Path, holder_seed: int | None,
                floor: SecurityFloor = SecurityFloor()) -> HolderSide:
    """The launcher's part on the holders' side: their folders under the run folder, what their secrets start from
    (kept owner-only in holders/, so that a resumed run hands out the same), their security floor, and the failure
    test hook. It goes to the holders' processes inside the ClientApp, never to the ServerApp."""
    root = run_dir / HOLDERS_FOLDER
    return HolderSide(holders_root=str(root.resolve()), provision=provision_holders(root, holder_seed), floor=floor,
                      fail_holders=tuple(config.fail_holders), fail_stage=config.fail_stage)


def run_variant(config: ExperimentConfig, run_dir: Path, variant: str, side: HolderSide, *, progress=print,
                stop_after_round: int | None = None) -> dict:
    """Run one variant on Flower's simulation engine and return its metrics."""
    settings = ServerSettings(config=config, run_dir=run_dir, variant=variant, progress=progress,
                              stop_after_round=stop_after_round)
    _quiet_logs()
    run_simulation(
        server_app=build_server_app(settings),
        client_app=build_client_app(side),
        num_supernodes=config.holders,
        backend_config=backend_config(config),
    )
    if settings.error is not None:
        if isinstance(settings.error, (UsageError, SystemExit)):
            raise settings.error
        raise RuntimeError(f"the {variant} run failed: {type(settings.error).__name__}: {settings.error}") from settings.error
    if settings.result is None:
        raise RuntimeError(f"the {variant} run ended without results; see the log above")
    return settings.result


def run_experiment(config: ExperimentConfig, run_dir: Path, *, holder_seed: int | None = None,
                   floor: SecurityFloor = SecurityFloor(), progress=print, stop_after_round=None) -> dict:
    write_setup(config, run_dir)
    side = holder_side(config, run_dir, holder_seed, floor)
    results = {}
    for variant in VARIANTS if config.baseline else VARIANTS[:1]:
        finished = run_dir / variant / METRICS_FILE
        if finished.exists():
            results[variant] = json.loads(finished.read_text())
            continue
        progress(f"== {variant}: {config.holders} holders, {config.rounds} rounds, {config.dataset}, {config.model}")
        results[variant] = run_variant(config, run_dir, variant, side, progress=progress,
                                       stop_after_round=stop_after_round)
    return write_report(config, run_dir, results, progress=progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        floor = floor_from_args(args)
        if args.resume:
            run_dir = Path(args.resume).expanduser()
            if not (run_dir / RUN_MARKER).is_file():
                raise UsageError(f"--resume {run_dir}: no {RUN_MARKER} there; give the folder of an earlier run")
            try:
                config = ExperimentConfig.from_json((run_dir / RUN_MARKER).read_text()).validate()
            except (ValueError, TypeError, AttributeError) as error:  # not JSON, or not a run's settings
                raise UsageError(f"--resume {run_dir}: its {RUN_MARKER} is not a run's settings ({error}); give the "
                                 "folder of an earlier run") from None
        else:
            config = config_from_args(args)
            check_floor(plan_run(config), floor)
            run_dir = prepare_run_dir(config, Path(args.out) if args.out else None)
        config = replace(config, out=str(run_dir))
        print(f"run folder: {run_dir}", flush=True)
        summary = run_experiment(config, run_dir, holder_seed=args.holder_seed, floor=floor,
                                 progress=lambda line: print(line, flush=True))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    final = summary["final"]
    line = f"final accuracy {final['accuracy']:.4f}"
    if "baseline_accuracy" in final:
        line += f", baseline {final['baseline_accuracy']:.4f} (difference {final['difference_pp']:+.2f} pp)"
    print(line)
    print(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
