"""`python -m simulation.run`: a federated MpLe experiment on Flower's simulation engine (Ray), with its baseline.

Results land in a run folder: config.json, metrics.json (+ metrics.csv), curves.png, keys.json, class_counts.*,
and each holder's own (owner-only) folder under holders/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import ray

from clients.client_app import HolderSide, build_client_app
from clients.floor import SecurityFloor
from clients.secrets import provision_holders
from server.plan import make_strategy, plan_run
from server.server_app import ServerSettings, build_server_app
from simulation.cli import check_floor, config_from_args, floor_from_args, parse_args
from simulation.config import HOLDER_DP, ExperimentConfig
from simulation.errors import UsageError
from simulation.protocol import VARIANTS
from simulation.report import write_report, write_setup
from simulation.run_folder import HOLDERS_FOLDER, METRICS_FILE, RUN_MARKER, prepare_run_dir
from strategies.registry import FIXED_PARAMETERS, SAMPLING_PARAMETERS, describe_strategy

RAY_CONNECT_TIMEOUT_S = 10.0


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


class RayInstance:
    """The Ray this run uses. With --ray-address, exactly that cluster; without, a private instance in its own
    temporary folder (`address="local"`), so that no bootstrap file that a stale or a stranger's cluster left behind
    is ever joined and two runs on one machine never share one. The run starts it itself (Flower then uses it as
    it is), so that its own signal handlers come after Ray's and `kill` stops the run, every process included."""

    def __init__(self, config: ExperimentConfig):
        self.address = config.ray_address
        self.temp = None if self.address else Path(tempfile.mkdtemp(prefix="mple-ray-", dir="/tmp"))

    def init_args(self) -> dict:
        args = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
        if self.address:
            return args | {"address": self.address}
        return args | {"address": "local", "_temp_dir": str(self.temp)}

    def start(self) -> None:
        """The holders' processes import the project from this process's sys.path. A private instance's workers
        inherit this process's environment; a cluster's get it through a runtime environment, which a private
        instance does without because Ray then cannot use its pre-started workers (about 4 s more per run)."""
        if not ray.is_initialized():
            path = os.pathsep.join(sys.path)
            if self.address:
                ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, **self.init_args())
            else:
                with _environment(PYTHONPATH=path):  # Ray's servers start here and keep it for their workers
                    ray.init(**self.init_args())

    def stop(self) -> None:
        """Every process of the private instance, and its folder; only this driver's connection to a cluster."""
        if ray.is_initialized():
            ray.shutdown()
        self.kill_processes()

    def kill_processes(self) -> None:
        """SIGKILL every process started in this instance's folder (Ray's servers and workers name it), then remove
        the folder."""
        if self.temp is not None:
            subprocess.run([sys.executable, "-c", _KILL_BY_FOLDER, str(self.temp), str(os.getpid())], check=False)

    def kill_processes_after_exit(self) -> None:
        """The same from a detached process, for a signal handler: the moment Ray's servers die, Ray's core in this
        process may end it, so this process leaves first and the cleaner finishes the job."""
        if self.temp is not None:
            subprocess.Popen([sys.executable, "-c", _KILL_BY_FOLDER, str(self.temp), str(os.getpid())],
                             start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def _environment(**variables: str):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_KILL_BY_FOLDER = """
import os, shutil, signal, sys, time
folder, spared = sys.argv[1], {int(sys.argv[2]), os.getpid()}
for attempt in range(5):
    found = False
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in spared:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                if folder.encode() in handle.read():
                    os.kill(int(name), signal.SIGKILL)
                    found = True
        except OSError:
            pass
    if not found:
        break
    time.sleep(0.1)
shutil.rmtree(folder, ignore_errors=True)
"""


def backend_config(config: ExperimentConfig) -> dict:
    """Flower's Ray backend settings; Ray itself is already started by the run (RayInstance), so no init_args."""
    return {"client_resources": {"num_cpus": config.cpus_per_holder, "num_gpus": config.gpus_per_holder}}


def check_ray_address(address: str | None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A HOST:PORT cluster that does not answer within `timeout_s` is one clear line, not a wait without end."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except ValueError:
        raise UsageError(f"--ray-address {address} is not HOST:PORT (or auto); give the head's address") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"cannot reach the Ray cluster at {address} within {timeout_s:.0f} s ({reason}); check the "
                         "address (ray status on the head) or drop --ray-address") from None


def holder_side(config: ExperimentConfig, run_dir: Path, holder_seed: int | None,
                floor: SecurityFloor = SecurityFloor()) -> HolderSide:
    """The launcher's part on the holders' side: their folders under the run folder, what their secrets start from
    (kept owner-only in holders/, so that a resumed run hands out the same), their security floor, and the failure
    test hook. It goes to the holders' processes inside the ClientApp, never to the ServerApp."""
    root = run_dir / HOLDERS_FOLDER
    return HolderSide(holders_root=str(root.resolve()), provision=provision_holders(root, holder_seed), floor=floor,
                      fail_holders=tuple(config.fail_holders), fail_stage=config.fail_stage)


def run_variant(config: ExperimentConfig, run_dir: Path, variant: str, side: HolderSide, *, progress=print,
                stop_after_round: int | None = None, on_ray_started=None) -> dict:
    """Run one variant on Flower's simulation engine and return its metrics."""
    settings = ServerSettings(config=config, run_dir=run_dir, variant=variant, progress=progress,
                              stop_after_round=stop_after_round)
    from flwr.simulation import run_simulation  # 1.7 s of import, not paid by a command that stops on bad input

    _quiet_logs()
    instance = RayInstance(config)
    try:
        instance.start()
        if on_ray_started is not None:
            on_ray_started(instance)
        run_simulation(
            server_app=build_server_app(settings),
            client_app=build_client_app(side),
            num_supernodes=config.holders,
            backend_config=backend_config(config),
        )
    finally:
        instance.stop()
    if settings.error is not None:
        if isinstance(settings.error, (UsageError, SystemExit)):
            raise settings.error
        raise RuntimeError(f"the {variant} run failed: {type(settings.error).__name__}: {settings.error}") from settings.error
    if settings.result is None:
        raise RuntimeError(f"the {variant} run ended without results; see the log above")
    return settings.result


def run_summary(config: ExperimentConfig, variant: str) -> str:
    """The settings a reader needs to know what ran: strategy and its own arguments, DP, local layers, key."""
    description = describe_strategy(make_strategy(config))
    defaults = SAMPLING_PARAMETERS + FIXED_PARAMETERS + ("train_metrics_aggr_fn", "evaluate_metrics_aggr_fn")
    own = {key: value for key, value in description["args"].items() if key not in defaults}
    strategy = description["name"] + (f" ({', '.join(f'{k}={v}' for k, v in own.items())})" if own else "")
    dp = description["differential_privacy"]
    privacy = "none" if not dp else f"{dp['mode']}-side clipping {dp['clipping_norm']}, noise {dp['noise_multiplier']}"
    if config.dp == HOLDER_DP:
        budget = (f"noise {config.dp_noise:g}" if config.dp_epsilon is None
                  else f"target epsilon {config.dp_epsilon:g} (each holder calibrates its noise)")
        privacy = (f"DP-SGD at each holder (Opacus), per-sample clipping {config.dp_clip:g}, {budget}, delta "
                   f"{config.dp_delta:g}, GroupNorm for BatchNorm")
    key = "none (baseline)" if variant == "baseline" else (
        f"{config.key_family}, q={config.block_size or 'image width'}, {config.key_entries} entries")
    return (f"   strategy {strategy}; DP {privacy}; local layers {', '.join(config.local_layers) or 'none'}; key {key}; "
            f"channel order {config.shuffle}; sampled per round {config.fraction_train:g} train / "
            f"{config.fraction_evaluate:g} evaluate")


class Stage:
    """Where a run is, for the line an interruption prints."""

    def __init__(self):
        self.now = "start-up"

    def follow(self, progress):
        def tracking(line: str) -> None:
            if line.startswith("== "):
                self.now = f"the start of {line[3:].split(':')[0]}"
            elif line.startswith("phase 0"):
                done, total = line.split("epoch ")[1].split(":")[0].split("/")
                self.now = "phase 0 (forming the first layer)" if done != total else "round 1"
            elif line.startswith("round "):
                done, total = line.split()[1].split("/")
                self.now = f"round {int(done) + 1} of {total}" if int(done) < int(total) else "the final evaluation"
            elif line.startswith("per-holder keys"):
                self.now = "the report"
            progress(line)

        return tracking


def run_experiment(config: ExperimentConfig, run_dir: Path, *, holder_seed: int | None = None,
                   floor: SecurityFloor = SecurityFloor(), progress=print, stop_after_round=None,
                   on_ray_started=None) -> dict:
    write_setup(config, run_dir)
    side = holder_side(config, run_dir, holder_seed, floor)
    results = {}
    for variant in VARIANTS if config.baseline else VARIANTS[:1]:
        finished = run_dir / variant / METRICS_FILE
        if finished.exists():
            results[variant] = json.loads(finished.read_text())
            continue
        progress(f"== {variant}: {config.holders} holders, {config.rounds} rounds, {config.dataset}, {config.model}")
        progress(run_summary(config, variant))
        results[variant] = run_variant(config, run_dir, variant, side, progress=progress,
                                       stop_after_round=stop_after_round, on_ray_started=on_ray_started)
    return write_report(config, run_dir, results, progress=progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = Stopper()
    stop.arm(None)
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
            check_ray_address(config.ray_address)
        else:
            config = config_from_args(args)
            plan = plan_run(config)
            check_floor(plan, floor)
            check_ray_address(config.ray_address)
            config = replace(config, block_size=plan.block_size)  # config.json says which q was used
            run_dir = prepare_run_dir(config, Path(args.out) if args.out else None)
        stop.run_dir = run_dir
        config = replace(config, out=str(run_dir))
        print(f"run folder: {run_dir}", flush=True)
        run_experiment(config, run_dir, holder_seed=args.holder_seed, floor=floor,
                       progress=stop.stage.follow(lambda line: print(line, flush=True)), on_ray_started=stop.arm)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return UsageError.exit_code
    finally:
        stop.disarm()
    print(f"results: {run_dir}")  # the report above has printed the final accuracy
    return 0


class Stopper:
    """Ctrl-C and SIGTERM, at any stage: one line saying where the run stopped and how to resume it, every Ray
    process of the run killed, and an exit without waiting for Flower's threads (the ServerApp's may be waiting on
    holders that are gone). Checkpoints are written atomically, so the last completed round's stays intact."""

    def __init__(self):
        self.stage = Stage()
        self.run_dir: Path | None = None
        self.instance: RayInstance | None = None
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def arm(self, instance: RayInstance | None) -> None:
        """Handle both signals; called again once Ray has started, as Ray installs its own SIGTERM handler."""
        self.instance = instance
        for sig in self.previous:
            signal.signal(sig, self)

    def disarm(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum, frame) -> None:
        where = "" if self.run_dir is None else (
            f"; the last completed round's checkpoint is kept: continue with python -m simulation.run --resume "
            f"{self.run_dir}")
        name = signal.Signals(signum).name
        print(f"stopped by {name} during {self.stage.now}{where}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if self.instance is not None:
            self.instance.kill_processes_after_exit()
        os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
