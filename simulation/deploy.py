"""`python -m simulation.deploy`: the MpLe apps on Flower's Deployment Engine, as a whole federation on this
machine's loopback address, for trying the deployment path out.

It starts one `flower-superlink` and one `flower-supernode` per holder, each SuperNode with its own Flower home and
its own holder folder (node config `holder-dir`: key, AugConv, holder-local layers and, with --split-data, the
holder's own data file, node config `dataset`). It then submits the run with `flwr run`, streams its log, checks
the run's real status (`flwr run` and `flwr log` exit 0 when a run fails) and stops every process it started, by its
own id, also on failure or Ctrl-C. docs/deployment.md shows the same steps by hand, across machines, with TLS.

Layout of --out: the run folder (config.json, metrics.json, first_layer.pt, mple/...), plus
  superlink/            the SuperLink's and the CLI's Flower home (config.toml, installed app) and its log
  holders/holder-XXXX/  each holder's own folder (owner-only): key, AugConv, local state, data.npz, supernode.log,
                        and its SuperNode's Flower home under flwr-home/
  deploy/               the preset and run configs handed to `flwr run`
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import tomli_w

from clients.floor import SecurityFloor
from clients.holder import holder_home
from clients.secrets import provision_holders
from server.plan import plan_run
from simulation.config import ExperimentConfig
from simulation.errors import UsageError
from simulation.files import atomic_write_bytes, atomic_write_text, private_dir
from simulation.placement import placement_for
from simulation.protocol import VARIANTS
from simulation.report import write_report, write_setup
from simulation.cli import check_floor, config_from_args, floor_from_args
from simulation.cli import parse_args as experiment_args
from simulation.run_folder import HOLDERS_FOLDER, METRICS_FILE, prepare_run_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "mple-local"
HOST = "127.0.0.1"
HOLDER_DATA_FILE = "data.npz"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
FINISHED = "finished:completed"


class DeploymentError(RuntimeError):
    """The federation could not start, a process died, or the run did not complete."""


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on the loopback address right now."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind((HOST, 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def tool(name: str) -> str:
    """A Flower (or Ray) command from this Python's environment, else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"command {name} not found; install the project (pip install -e .) in this environment")
    return found


def tool_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's commands: its own Flower home, no dependency installation (offline), and this
    environment's bin folder first (SuperLink and SuperNode start `flower-superexec` by name)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start_process(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a command in its own process group (so that stopping it reaches its direct children), output to `log`."""
    with open(log, "ab") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the process's own group (its id), SIGKILL if it has not exited within STOP_TIMEOUT_S."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def preset_toml(config: ExperimentConfig) -> str:
    """The experiment as a TOML preset (what `load_toml` reads), so the ServerApp gets every setting."""
    values = {name.replace("_", "-"): value for name, value in config.to_dict().items()
              if value is not None and name not in ("out", "strategy", "strategy_args")}
    values["strategy"] = {"name": config.strategy, "args": dict(config.strategy_args)}
    return tomli_w.dumps(values)


def holder_data_npz(config: ExperimentConfig, holder: int) -> bytes:
    """Holder `holder`'s partition of the experiment dataset as a MedMNIST-layout .npz (train and test splits)."""
    placement = placement_for(config)
    source = placement.dataset.train
    arrays = {}
    for split, indices in (("train", placement.holder_train[holder]), ("test", placement.holder_test[holder])):
        if len(indices) == 0:
            raise UsageError(f"holder {holder} has no {split} images to write; raise --test-fraction or use fewer "
                             "holders with --split-data")
        images = source.images[indices]
        channels = images.shape[1]
        if channels not in (1, 3):
            raise UsageError(f"--split-data writes grey or RGB images; this dataset has {channels} channels")
        arrays[f"{split}_images"] = images[:, 0] if channels == 1 else images.transpose(0, 2, 3, 1)
        arrays[f"{split}_labels"] = source.labels[indices]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class LocalDeployment:
    """One SuperLink and one SuperNode per holder on the loopback address, all owned by this object: `stop()` ends
    every process it started. Use as a context manager."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, *, split_data: bool = False, progress=print,
                 stream_logs: bool = True, holder_seed: int | None = None, floor: SecurityFloor = SecurityFloor()):
        self.config = config
        self.holder_seed = holder_seed
        self.floor = floor
        self.run_dir = Path(run_dir).resolve()
        self.split_data = split_data
        self.progress = progress
        self.stream_logs = stream_logs
        self.superlink_dir = self.run_dir / "superlink"
        self.flwr_home = self.superlink_dir / "flwr-home"
        self.deploy_dir = self.run_dir / "deploy"
        self.port: int | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.helpers: list[subprocess.Popen] = []
        self._node_configs: list[str] = []
        self._reported_exit: set[int] = set()

    # ------------------------------------------------------------ processes
    @property
    def processes(self) -> list[subprocess.Popen]:
        return [process for process in (self.superlink, *self.supernodes, *self.helpers) if process is not None]

    def holder_dir(self, holder: int) -> Path:
        return holder_home(self.run_dir, holder)

    def __enter__(self) -> "LocalDeployment":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start_superlink()
            self._start_supernodes()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process this deployment started, SuperNodes first, by their own ids."""
        for process in (*self.helpers, *self.supernodes, self.superlink):
            if process is not None:
                stop_process(process)

    def _start_superlink(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.deploy_dir.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        atomic_write_text(self.flwr_home / "config.toml", (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.port}"\ninsecure = true\n'
        ))
        command = [tool("flower-superlink"), "--insecure", "--host", HOST, "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
        log = self.superlink_dir / "superlink.log"
        self.superlink = start_process(command, log, tool_environment(self.flwr_home))
        self._wait_until(self._superlink_ready, f"the SuperLink did not start; see {log}")
        self.progress(f"SuperLink on {HOST}:{self.port} (log {log})")

    def _superlink_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _start_supernodes(self) -> None:
        holders = self.config.holders
        # Each holder's secrets go into its own folder before its SuperNode starts, never onto a command line.
        provision = provision_holders(self.run_dir / HOLDERS_FOLDER, self.holder_seed)
        for holder in range(holders):
            folder = private_dir(self.holder_dir(holder))
            provision.secrets_for(folder, holder)
            node_config = (f'partition-id={holder} num-partitions={holders} holder-dir="{folder}" '
                           f'key-families="{",".join(self.floor.families)}" min-block-size={self.floor.min_block_size}')
            if self.split_data:
                data = atomic_write_bytes(folder / HOLDER_DATA_FILE, holder_data_npz(self.config, holder),
                                          private=True)
                node_config += f' dataset="npz:{data}"'
            (folder / "flwr-home").mkdir(exist_ok=True)
            self._node_configs.append(node_config)
            self.supernodes.append(self._supernode(holder))
        self.progress(f"{holders} SuperNodes, one per holder folder under {self.run_dir / 'holders'}")

    def supernode_command(self, holder: int) -> list[str]:
        """The command that starts holder `holder`'s SuperNode on a free port, with its folder and node config."""
        (port,) = free_ports(1)
        return [tool("flower-supernode"), "--insecure", "--superlink", f"{HOST}:{self.port}", "--host", HOST,
                "--port", str(port), "--node-config", self._node_configs[holder]]

    def _supernode(self, holder: int) -> subprocess.Popen:
        folder = self.holder_dir(holder)
        return start_process(self.supernode_command(holder), folder / "supernode.log",
                             tool_environment(folder / "flwr-home"))

    def kill_supernode(self, holder: int) -> None:
        """What a holder's machine dying looks like to the federation: its SuperNode and the ClientApp it runs are
        killed at once (SIGKILL to the process group), with no goodbye to the SuperLink."""
        process = self.supernodes[holder]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=STOP_TIMEOUT_S)

    def restart_supernode(self, holder: int) -> None:
        """Start holder `holder`'s SuperNode again with its own folder: it connects as a new node, and its holder
        comes back with the key, AugConv and holder-local layers kept in that folder."""
        if self.supernodes[holder].poll() is None:
            raise DeploymentError(f"the SuperNode of holder {holder} is still running")
        self.supernodes[holder] = self._supernode(holder)
        self._reported_exit.discard(holder)
        self.progress(f"SuperNode of holder {holder} restarted")

    def _wait_until(self, ready, message: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.3)
        raise DeploymentError(message)

    def _check_alive(self) -> None:
        """The SuperLink must live. A SuperNode may die (a holder's machine does): with --round-timeout set, the
        rounds count its holder as failed and the run goes on, so that is said once; without it, a round would wait
        for that holder forever, so the run is stopped."""
        if self.superlink is not None and self.superlink.poll() is not None:
            raise DeploymentError(f"the SuperLink exited (code {self.superlink.returncode}); see "
                                  f"{self.superlink_dir / 'superlink.log'}")
        for holder, process in enumerate(self.supernodes):
            if process.poll() is None or holder in self._reported_exit:
                continue
            log = self.holder_dir(holder) / "supernode.log"
            if self.config.round_timeout is None:
                raise DeploymentError(f"the SuperNode of holder {holder} exited (code {process.returncode}); see "
                                      f"{log}. With --round-timeout SECONDS a run goes on without a holder that "
                                      "stops replying")
            self._reported_exit.add(holder)
            self.progress(f"the SuperNode of holder {holder} exited (code {process.returncode}; see {log}); its "
                          f"holder counts as failed after --round-timeout {self.config.round_timeout:g} s. To bring "
                          f"it back with its folder: FLWR_HOME={self.holder_dir(holder) / 'flwr-home'} "
                          + " ".join(shlex.quote(part) for part in self.supernode_command(holder)))

    # ------------------------------------------------------------ runs
    def flwr(self, *arguments: str, timeout: float = 120) -> dict:
        """A `flwr` command against this SuperLink, with --format json; its JSON answer."""
        command = [tool("flwr"), *arguments, "--format", "json"]
        done = subprocess.run(command, capture_output=True, text=True, env=tool_environment(self.flwr_home),
                              cwd=self.deploy_dir, timeout=timeout)
        try:
            answer = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            raise DeploymentError(f"`flwr {arguments[0]}` gave no JSON answer (exit {done.returncode}): "
                                  f"{(done.stdout + done.stderr).strip()[-500:]}") from None
        if not answer.get("success", False):
            raise DeploymentError(f"`flwr {arguments[0]}` failed: {answer.get('error-message', answer)}")
        return answer

    def submit(self, variant: str, **overrides) -> int:
        """Start one run of the apps (`flwr run`) and return its run id; `overrides` are run-config entries
        (`connect_timeout=5` for `connect-timeout = 5`) on top of the deployment's experiment."""
        preset = self.deploy_dir / "experiment.toml"
        atomic_write_text(preset, preset_toml(self.config))
        run_config = self.deploy_dir / f"run-{variant}.toml"
        entries = {"preset": str(preset), "out": str(self.run_dir), "variant": variant,
                   "holders": self.config.holders, "shuffle": self.config.shuffle,
                   **{name.replace("_", "-"): value for name, value in overrides.items()}}
        atomic_write_text(run_config, tomli_w.dumps(entries))
        answer = self.flwr("run", str(PROJECT_ROOT), CONNECTION, "--run-config", str(run_config))
        return int(answer["run-id"])

    def status(self, run_id: int) -> str:
        (run,) = self.flwr("ls", CONNECTION, "--run-id", str(run_id))["runs"]
        return str(run["status"])

    def wait(self, run_id: int, timeout: float | None = None) -> str:
        """Follow a run until it finishes (streaming its log unless told not to) and return its final status;
        stop it if a process dies or `timeout` (seconds) passes."""
        log = self.deploy_dir / f"run-{run_id}.log"
        command = [tool("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        output = None if self.stream_logs else open(log, "ab")
        try:
            streamer = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=tool_environment(self.flwr_home), start_new_session=True)
        finally:
            if output is not None:
                output.close()
        self.helpers.append(streamer)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while streamer.poll() is None:
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s")
                time.sleep(1)
            status = self.status(run_id)
            while not status.startswith("finished"):  # the log stream can end just before the status changes
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s")
                time.sleep(2)
                status = self.status(run_id)
            return status
        except BaseException:
            self._stop_run(run_id)
            raise
        finally:
            stop_process(streamer)
            self.helpers.remove(streamer)

    def _stop_run(self, run_id: int) -> None:
        if self.superlink is not None and self.superlink.poll() is None:
            try:
                self.flwr("stop", str(run_id), CONNECTION, timeout=30)
            except (DeploymentError, subprocess.TimeoutExpired):
                pass

    def run_variant(self, variant: str, timeout: float | None = None, **overrides) -> dict:
        """One variant end to end; its metrics (what the ServerApp wrote), or DeploymentError if it failed."""
        run_id = self.submit(variant, **overrides)
        self.progress(f"run {run_id} ({variant}) submitted")
        status = self.wait(run_id, timeout)
        if status != FINISHED:
            raise DeploymentError(f"run {run_id} ({variant}) ended with status {status}; see its log above or "
                                  f"`flwr log {run_id} {CONNECTION} --show` with FLWR_HOME={self.flwr_home}")
        metrics = self.run_dir / variant / METRICS_FILE
        if not metrics.is_file():
            raise DeploymentError(f"run {run_id} ({variant}) completed but wrote no {metrics}")
        return json.loads(metrics.read_text())


# ---------------------------------------------------------------- command line
def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.deploy",
        description="Run an MpLe experiment on Flower's Deployment Engine on this machine: one SuperLink, one "
        "SuperNode per holder with its own folder, `flwr run`, then stop them all. Every other flag is an "
        "experiment flag of `python -m simulation.run` (see its --help); --resume and --ray-address do not apply.",
    )
    parser.add_argument("--split-data", action="store_true",
                        help="write each holder's partition into its folder (data.npz) and have its SuperNode "
                        "load that file (node config dataset=npz:PATH) instead of the experiment dataset's partition")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="stop a run that takes longer than this")
    parser.add_argument("--quiet", action="store_true", help="write the runs' logs to deploy/ instead of the screen")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    own, rest = parse_args(argv)
    args = experiment_args(rest)
    try:
        if args.resume:
            raise UsageError("--resume is for python -m simulation.run; a deployment run starts a new run folder")
        if args.ray_address:
            raise UsageError("--ray-address is for python -m simulation.run; the Deployment Engine does not use Ray")
        if own.timeout is not None and own.timeout <= 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {own.timeout}")
        if args.fail_holders:
            raise UsageError("--fail-holders is a test hook of python -m simulation.run; under the Deployment "
                             "Engine stop a SuperNode instead")
        config = config_from_args(args)
        plan = plan_run(config)
        check_floor(plan, floor_from_args(args))
        config = replace(config, block_size=plan.block_size)  # config.json says which q was used
        run_dir = prepare_run_dir(config, Path(args.out) if args.out else None).resolve()
        print(f"run folder: {run_dir}", flush=True)
        write_setup(config, run_dir)
        results = {}
        with _stopped_by_sigterm(), LocalDeployment(config, run_dir, split_data=own.split_data,
                                                   progress=lambda line: print(line, flush=True),
                                                   stream_logs=not own.quiet,
                                                   holder_seed=args.holder_seed,
                                                   floor=floor_from_args(args)) as deployment:
            for variant in VARIANTS if config.baseline else VARIANTS[:1]:
                print(f"== {variant}: {config.holders} holders, {config.rounds} rounds, {config.dataset}, "
                      f"{config.model}", flush=True)
                results[variant] = deployment.run_variant(variant, own.timeout)
        summary = write_report(config, run_dir, results, progress=lambda line: print(line, flush=True))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except DeploymentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process of the deployment was stopped", file=sys.stderr)
        return 130
    print(f"final accuracy {summary['final']['accuracy']:.4f}")
    print(f"results: {run_dir}")
    return 0


class _stopped_by_sigterm:
    """Turn SIGTERM into KeyboardInterrupt while deploying, so that `kill PID` also stops every started process."""

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
