"""Reliability through the real command line and Flower's Ray engine: injected holder failures, a run killed with
SIGKILL and resumed, the same seed twice, holders created only when sampled, and bad input to every command.

Each engine run is a `python -m simulation.run` subprocess (~20-30 s, mostly Ray start-up). The bad-input table
calls each command's main() in process (no Ray starts: every case fails before a run would) and a few cases go
through subprocesses to prove the exit code of the real entry points.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clients.holder import Holder, HolderCache, holder_home
from clients.secrets import HolderSecrets
from server.first_layer import initial_model
from simulation.config import build_config
from simulation.deploy import free_ports
from simulation.placement import placement_for
from simulation.protocol import HolderSettings

from .inprocess import run_in_process

ROOT = Path(__file__).resolve().parents[1]
ENGINE_TIMEOUT_S = 300
# Three holders, two sampled per round, the classifier kept at each holder: resuming must restore the sampling
# state and each holder's local layers, not just the global weights.
SMALL_RUN = ["--holders", "3", "--rounds", "3", "--pretrain-epochs", "1", "--fraction-train", "0.67",
             "--local-layers", "classifier.3", "--holder-seed", "11"]


def without_seconds(value):
    """Metrics less their wall-clock fields, which no two runs share."""
    if isinstance(value, dict):
        return {key: without_seconds(item) for key, item in value.items() if key != "seconds"}
    if isinstance(value, list):
        return [without_seconds(item) for item in value]
    return value


def run_metrics(run_dir: Path) -> dict:
    return {name: without_seconds(json.loads((run_dir / name).read_text()))
            for name in ("metrics.json", "mple/metrics.json")}


def rounds_done(run_dir: Path) -> int:
    progress = run_dir / "mple" / "progress.json"
    return len(json.loads(progress.read_text())["rounds"]) if progress.exists() else 0


# ------------------------------------------------------------------------------------------ holders at scale
def test_holders_are_created_only_when_sampled(tmp_path):
    metrics, _, run = run_in_process(tmp_path, 20, rounds=1, fraction_train=0.1, fraction_evaluate=0.1)
    run_dir = run.settings.run_dir
    (row,) = metrics["rounds"]
    sampled = {0}  # holder 0 brings the initial backbone into the federation's channel order
    for table in (row["per_holder"], row["per_holder_eval"], metrics["final"]["per_holder"]):
        assert len(table) == 2
        sampled |= {int(holder) for holder in table}
    with_folder = {holder for holder in range(20) if holder_home(run_dir, holder).exists()}
    assert with_folder == sampled
    assert all((holder_home(run_dir, holder) / "key.mple").exists() for holder in sampled)


def test_holders_index_one_dataset_per_process_and_the_cache_is_bounded(tmp_path):
    config = build_config({"holders": 20})
    federation = placement_for(config)
    first = initial_model(config, federation).first
    settings = HolderSettings.from_config(config, "mple")
    holders = [Holder(h, settings, tmp_path / f"holder-{h}", HolderSecrets.from_holder_seed(0, h), first,
                      torch.device("cpu")) for h in range(3)]
    for holder in holders:
        # Holders keep index arrays into the one dataset of the process, never a copy of their images.
        assert holder._sources["train"] is federation.dataset.train
        assert holder._sources["global"] is federation.dataset.test

    created = []
    cache = HolderCache(2)
    for name in ("a", "b", "a", "c", "b"):
        cache.get(name, lambda: created.append(name) or name)
    assert created == ["a", "b", "c", "b"] and len(cache) == 2  # "b" was evicted by "c", then rebuilt


def test_evaluation_uses_the_local_layers_each_holder_trained_this_round(tmp_path):
    metrics, _, _ = run_in_process(tmp_path, 3, rounds=1, local_layers=["classifier.3"])
    # Same global backbone, same test images: only each holder's own trained head tells their losses apart (with
    # the initial head for all, as when evaluation read the previous round's local state, they agree to ~1e-7).
    losses = [row["eval_loss"] for row in metrics["final"]["per_holder"].values()]
    assert len(losses) == 3 and max(losses) - min(losses) > 1e-4


def test_holders_without_test_images_do_not_stop_the_run(tmp_path):
    metrics, _, _ = run_in_process(tmp_path, 3, rounds=1, test_fraction=0.0)
    (row,) = metrics["rounds"]
    assert (row["holders_evaluated"], row["accuracy"]) == (3, None)  # nothing to score on the holders' own splits
    assert metrics["final"]["holders"] == 3 and metrics["final"]["accuracy"] > 0  # the official test split


# ------------------------------------------------------------------------------------------ the real engine
FAILURES_RUN = ["--holders", "4", "--rounds", "1", "--pretrain-epochs", "1", "--shuffle", "none", "--fail-holders", "1,3",
                "--min-holders", "3", "--holder-seed", "1"]


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory) -> dict:
    """Two runs started at the same moment, where a Ray bootstrap file (as a stopped cluster leaves it) sits in the
    Ray temp folder and RAY_ADDRESS names a cluster that is gone: SMALL_RUN, the uninterrupted reference of the
    stop-and-resume test below, and FAILURES_RUN, with injected failures. One pair of runs serves three tests, so the
    suite starts two runs fewer."""
    root = tmp_path_factory.mktemp("concurrent")
    ray_tmp = root / "raytmp"
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp), "RAY_ADDRESS": "127.0.0.1:1"}
    processes = {name: subprocess.Popen([sys.executable, "-m", "simulation.run", *argv, "--out", str(root / name)],
                                        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, argv in (("reference", SMALL_RUN), ("failures", FAILURES_RUN))}
    runs = {"ray_tmp": ray_tmp}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=ENGINE_TIMEOUT_S)
        runs[name] = (root / name, process.returncode, output)
    return runs


def test_injected_failures_are_counted_and_min_holders_is_honoured(concurrent_runs):
    out, returncode, output = concurrent_runs["failures"]
    assert returncode == 0, output[-2000:]
    assert "failures 2" in output and "(round not counted)" in output
    metrics = json.loads((out / "mple" / "metrics.json").read_text())
    (row,) = metrics["rounds"]
    assert (row["holders_trained"], row["train_failures"], row["counted"]) == (2, 2, False)
    assert set(row["per_holder"]) == {"0", "2"}
    assert (row["holders_evaluated"], row["evaluate_failures"]) == (4, 0)
    reasons = " ".join(row["failure_reasons"])
    assert "holder 1 failed on purpose" in reasons and "holder 3 failed on purpose" in reasons
    # Two successes are fewer than --min-holders 3: the round may not move the global weights.
    initial = torch.load(out / "first_layer.pt")["backbone"]
    final = torch.load(out / "mple" / "checkpoint.pt", weights_only=False)["arrays"]
    assert final and all(torch.equal(value, initial[name].float()) for name, value in final.items())


@pytest.fixture(scope="module")
def reference_run(concurrent_runs) -> Path:
    """An uninterrupted run. The stopped-and-resumed runs below must end with its metrics exactly: that is also the
    test that the same seeds give the same metrics through the command line, in other processes."""
    out, returncode, output = concurrent_runs["reference"]
    assert returncode == 0, output[-2000:]
    assert [row["round"] for row in run_metrics(out)["mple/metrics.json"]["rounds"]] == [1, 2, 3]
    return out


def private_ray_folders() -> set[Path]:
    return set(Path("/tmp").glob("mple-ray-*"))


def processes_in(folders) -> list[str]:
    """Command lines of live processes that name one of `folders` (Ray's servers and workers name their folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if any(str(folder) in command for folder in folders):
                    found.append(command[:120])
    return found


def stop_mid_round(argv: list[str], out: Path, log: Path, stop_signal: signal.Signals, round_: int):
    """Run `simulation.run argv` and send it `stop_signal` once round `round_ - 1` is checkpointed and round `round_`
    is half done (a holder has saved its state of that round). Returns the process, how long it took to stop after
    the signal, and the private Ray folders it made."""
    before = private_ray_folders()
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "simulation.run", *argv], cwd=ROOT, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while not (rounds_done(out) == round_ - 1 and any(out.glob(f"holders/*/local-mple-r{round_:05d}.pt"))):
            assert process.poll() is None, f"the run ended before it could be stopped:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"round {round_} never started"
            time.sleep(0.02)
        ours = private_ray_folders() - before
        sent = time.monotonic()
        process.send_signal(stop_signal)
        process.wait(timeout=30)
        stopped_within = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):  # Ray's processes, if a SIGKILL left them
            os.killpg(process.pid, signal.SIGKILL)
    assert rounds_done(out) == round_ - 1, f"round {round_} finished before the signal landed"
    assert not (out / "mple" / "metrics.json").exists()
    return process, stopped_within, ours


def assert_stopped_cleanly(process, stopped_within: float, ours: set[Path], text: str, stop_signal, where: str):
    """A signal the run can handle: one line saying where it stopped and how to resume, quickly, no traceback, and
    no process of its private Ray left."""
    assert stopped_within < 5 and process.returncode == 128 + stop_signal
    assert f"stopped by {stop_signal.name} during {where}" in text and "--resume" in text
    assert "Traceback" not in text
    assert len(ours) == 1
    for _ in range(50):  # the run's cleaner, detached as the run exits, kills its Ray processes within moments
        if not processes_in(ours) and not any(folder.exists() for folder in ours):
            break
        time.sleep(0.1)
    assert not processes_in(ours) and not any(folder.exists() for folder in ours)


def test_a_run_stopped_twice_mid_round_resumes_to_the_same_metrics(tmp_path, reference_run):
    """Killed (SIGKILL: no handler runs) in round 2, resumed, stopped by Ctrl-C (SIGINT) in round 3, resumed again:
    the metrics are those of the uninterrupted run. SIGTERM, which Ray handles too, is the heavy test below."""
    out = tmp_path / "stopped"
    stop_mid_round([*SMALL_RUN, "--out", str(out)], out, tmp_path / "killed.log", signal.SIGKILL, 2)

    log = tmp_path / "resumed-then-stopped.log"
    process, stopped_within, ours = stop_mid_round(["--resume", str(out)], out, log, signal.SIGINT, 3)
    text = log.read_text()
    assert "resuming mple after round 1/3" in text
    assert_stopped_cleanly(process, stopped_within, ours, text, signal.SIGINT, "round 3 of 3")

    resumed = subprocess.run([sys.executable, "-m", "simulation.run", "--resume", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming mple after round 2/3" in resumed.stdout
    assert run_metrics(out) == run_metrics(reference_run)


@pytest.mark.heavy
def test_sigterm_mid_round_stops_the_run_and_every_ray_process(tmp_path):
    out = tmp_path / "stopped"
    log = tmp_path / "stopped.log"
    process, stopped_within, ours = stop_mid_round([*SMALL_RUN, "--out", str(out)], out, log, signal.SIGTERM, 2)
    assert_stopped_cleanly(process, stopped_within, ours, log.read_text(), signal.SIGTERM, "round 2 of 3")


def test_a_stale_bootstrap_file_or_ray_address_is_never_joined_and_two_runs_share_nothing(concurrent_runs):
    """A run without --ray-address starts its own Ray and finishes, whatever bootstrap file or RAY_ADDRESS a gone
    cluster left; two at once both finish."""
    for name in ("reference", "failures"):
        _, returncode, output = concurrent_runs[name]
        assert returncode == 0, output[-2000:]
        assert "results:" in output
    assert (concurrent_runs["ray_tmp"] / "ray" / "ray_current_cluster").read_text() == "127.0.0.1:1\n"  # never used


def test_a_federation_with_fewer_holders_than_the_run_names_the_missing_ones_within_the_timeout(tmp_path):
    """As `flwr run . --run-config holders=4` against Flower's default two SuperNodes: no silent wait."""
    from simulation.errors import UsageError

    started = time.monotonic()
    with pytest.raises(UsageError, match=r"only 2 of 4 holders connected within 2 s; missing holder\(s\) 2, 3.*holders=2"):
        run_in_process(tmp_path, 4, nodes=2, connect_timeout=2.0)
    assert time.monotonic() - started < 30


def test_memory_that_keys_would_need_is_checked_before_anything_starts(tmp_path, capsys):
    from server.first_layer import initial_model
    from server.plan import check_memory
    from simulation.errors import UsageError
    from simulation.run import main

    config = build_config({"holders": 10, "key_family": "dense", "image_size": 64})
    model = initial_model(config, placement_for(config))
    one = check_memory(config, (1, 64, 64), model, 0, memory_bytes=64 * 2**30)  # 4096 x 4096 key, its inverse, AugConv
    assert one == 2 * 8 * 4096**2 + 4096 * 32 * 64 * 64 * 4
    with pytest.raises(UsageError, match=r"needs 2\.25 GiB per holder .* more than half of this machine's 4\.0 GiB"):
        check_memory(config, (1, 64, 64), model, 0, memory_bytes=4 * 2**30)
    with pytest.raises(UsageError, match="lower --holder-cache to"):
        check_memory(config, (1, 64, 64), model, 0, memory_bytes=12 * 2**30)
    assert main(["--key-family", "dense", "--image-size", "256", "--out", str(tmp_path / "run")]) == 2
    assert "GiB per holder" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_an_unreachable_ray_address_is_one_line_within_a_bounded_time(tmp_path, capsys):
    from simulation.run import main

    (port,) = free_ports(1)
    started = time.monotonic()
    assert main(["--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "run")]) == 2
    assert time.monotonic() - started < 15
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in error
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ bad input
def _run(argv):
    from simulation.run import main

    return main(argv)


def _keys(argv):
    from simulation.keys import main

    return main(argv)


def _attack(name):
    def command(argv):
        return __import__(f"server.attacks.{name}.__main__", fromlist=["main"]).main(argv)

    command.__name__ = name
    return command


def case(command, argv, problem, *, broken=None):
    """One bad command line and what the last line of stderr must say; `broken` names a known bug (xfail)."""
    marks = [pytest.mark.xfail(strict=True, reason=broken)] if broken else []
    name = command.__name__.strip("_")
    return pytest.param(command, argv, problem, marks=marks, id=f"{name} {' '.join(argv)}")


QUICK_COMPARE = ["--holders", "1", "--timing-repeats", "1", "--samples", "1", "--no-known-plaintext"]

# Files named here are made by the `workspace` fixture.
BAD_INPUT = [
    case(_run, ["--holders", "ten"], "argument --holders: invalid int value: 'ten'"),
    case(_run, ["--holders", "0"], "--holders must be a positive integer"),
    case(_run, ["--lr", "nan"], "--lr must lie in"),
    case(_run, ["--fail-stage", "sleep"], "invalid choice: 'sleep'"),
    case(_run, ["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    case(_run, ["--dataset", "npz:missing.npz"], "missing.npz"),
    case(_run, ["--config", "missing.toml"], "config file missing.toml does not exist"),
    case(_run, ["--config", "broken.toml"], "is not valid TOML"),
    case(_run, ["--config", "unknown.toml"], "unknown setting 'colour'"),
    case(_run, ["--model", "resnet50"], "--model must be one of"),
    case(_run, ["--strategy", "fedfoo"], "unknown strategy 'fedfoo'"),
    case(_run, ["--local-layers", "nosuch"], "--local-layers names ['nosuch']"),
    case(_run, ["--holders", "3", "--min-holders", "5"], "--min-holders 5 exceeds --holders 3"),
    case(_run, ["--holders", "3", "--fail-holders", "7"], "holder ids are 0..2"),
    case(_run, ["--public-fraction", "0"], "needs a public split"),
    case(_run, ["--holders", "1000"], "cannot be shared among 1000 holders"),  # digits has 1,438 training images
    case(_run, ["--block-size", "5", "--out", "new"], "block size q = 5 does not divide N = 64"),
    case(_run, ["--first-layer", "file:notes.txt", "--out", "new"], "first-layer file notes.txt"),
    case(_run, ["--out", "earlier"], "already exists and is not empty"),
    case(_run, ["--out", "notes.txt"], "is a file"),
    case(_run, ["--out", "notes.txt/run"], "cannot create run folder"),
    case(_run, ["--resume", "nowhere"], "no config.json there"),
    case(_run, ["--resume", "foreign"], "is not a run's settings"),
    case(_keys, [], "needs a subcommand first: compare"),
    case(_keys, ["compare", "--key-family", "triangle"], "invalid choice: 'triangle'"),
    case(_keys, ["compare", "--holders", "0", "--out", "new"], "must be a positive integer, got 0"),
    case(_keys, ["compare", "--dataset", "nosuch", "--out", "new"], "unknown dataset 'nosuch'"),
    case(_keys, ["compare", "--block-size", "5", "--out", "new"], "block size q = 5"),
    case(_keys, ["compare", "--first-layer", "missing.pt", "--out", "new"], "missing.pt does not exist"),
    case(_keys, ["compare", "--samples", "0", "--out", "new"], "--samples"),
    case(_keys, ["compare", *QUICK_COMPARE, "--out", "notes.txt"], "notes.txt"),
    case(_keys, ["compare", *QUICK_COMPARE, "--out", "earlier"], "earlier"),
    case(_attack("cross_key"), ["--holders", "0", "--out", "new"], "must be a positive integer, got 0"),
    case(_attack("known_plaintext"), ["--known", "0", "--out", "new"], "expected comma-separated positive integers"),
    case(_attack("reversing"), ["--nonsense"], "unrecognized arguments: --nonsense"),
    case(_attack("feature_leakage"), ["--dataset", "nosuch", "--out", "new"], "unknown dataset 'nosuch'"),
    case(_attack("feature_leakage"), ["--samples", "0", "--out", "new"], "--samples"),
]


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A folder as a user might have it: an earlier run's results, a text file, broken and foreign settings."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"final": {"accuracy": 0.97}}\n')
    (earlier / "keys.json").write_text('{"holders": []}\n')
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "broken.toml").write_text("holders = [\n")
    (tmp_path / "unknown.toml").write_text("colour = 3\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"name": "another tool"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command, argv, problem", BAD_INPUT)
def test_bad_input_gives_one_clear_line_and_exit_code_2(workspace, capsys, command, argv, problem):
    before = snapshot(workspace)
    try:
        code = command(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    error = capsys.readouterr().err
    lines = error.strip().splitlines()
    assert code == 2 and lines, error
    assert "Traceback" not in error
    assert "error:" in lines[-1] and problem in lines[-1], error
    if not error.startswith("usage:"):  # argparse's usage block, then its error line (simulation.run: one line)
        assert len(lines) == 1, error
    assert snapshot(workspace) == before  # no half-written run folder, earlier results untouched


@pytest.mark.parametrize("argv, problem", [
    (["simulation.run", "--holders", "ten"], "invalid int value: 'ten'"),
    (["simulation.run", "--holders", "3", "--min-holders", "5", "--out", "new"], "--min-holders 5 exceeds"),
    (["simulation.keys", "compare", "--block-size", "5", "--out", "new"], "block size q = 5"),
], ids=["run-argparse", "run-usage", "keys-usage"])
def test_bad_input_exit_code_through_the_entry_points(workspace, argv, problem):
    result = subprocess.run([sys.executable, "-m", *argv], cwd=workspace, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and problem in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workspace / "new").exists()


# ------------------------------------------------------------------------------------------ one output rule, clear messages
COMMAND_RESULTS = [
    ("simulation.keys", ["compare", "--holders", "1", "--samples", "2", "--timing-repeats", "1", "--no-known-plaintext"],
     "keys", "keys.json"),
    ("server.attacks.known_plaintext", ["--known", "1", "--test-images", "2"], "known_plaintext", "known_plaintext.json"),
    ("server.attacks.reversing", ["--test-images", "2"], "reversing", "reversing.json"),
    ("server.attacks.feature_leakage", ["--samples", "2"], "feature_leakage", "feature_leakage.json"),
    ("server.attacks.cross_key", ["--holders", "2", "--epochs", "1"], "cross_key", "cross_key.json"),
    ("server.attacks.ciphertext_only", ["--holder-images", "40", "--public-images", "40", "--attacked", "4"],
     "ciphertext_only", "ciphertext_only.json"),
    ("server.attacks.gradient_inversion", ["--iterations", "2", "--restarts", "1", "--public-images", "4"],
     "gradient_inversion", "gradient_inversion.json"),
]


@pytest.mark.parametrize("module, argv, command, result", COMMAND_RESULTS, ids=[row[2] for row in COMMAND_RESULTS])
def test_every_command_writes_a_new_folder_per_run_and_never_overwrites(tmp_path, monkeypatch, capsys, module, argv,
                                                                        command, result):
    monkeypatch.chdir(tmp_path)
    main = __import__(module if module == "simulation.keys" else f"{module}.__main__", fromlist=["main"]).main
    assert main(argv + ["--holder-seed", "1"]) == 0
    assert main(argv + ["--holder-seed", "1"]) == 0
    runs = sorted((tmp_path / "results" / command).iterdir())
    assert len(runs) == 2 and all((run / result).is_file() for run in runs)  # two runs, two folders
    earlier = (runs[0] / result).read_bytes()
    capsys.readouterr()
    assert main(argv + ["--holder-seed", "2", "--out", str(runs[0])]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"already holds {result}" in error
    assert (runs[0] / result).read_bytes() == earlier


def test_messages_name_the_problem_and_the_fix(tmp_path, capsys):
    from simulation.run import main

    (tmp_path / "images").mkdir()
    preset = tmp_path / "preset.toml"
    preset.write_text('holdres = 3\n')
    cases = [
        (["--dataset", f"npz:{tmp_path / 'images'}"], ["is a folder, not an .npz file", f"folder:{tmp_path / 'images'}"]),
        (["--holders", "1000"], ["each holder needs at least 2", "at most"]),
        (["--config", str(preset)], ["unknown setting 'holdres'", "did you mean 'holders'", "the settings are"]),
    ]
    for argv, fragments in cases:
        assert main(argv + ["--out", str(tmp_path / "run")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and all(fragment in error for fragment in fragments), error
    assert not (tmp_path / "run").exists()
    from simulation.keys import main as keys_main

    assert keys_main(["--holders", "3"]) == 2
    assert "needs a subcommand first: compare" in capsys.readouterr().err


def test_help_shows_each_default_once_and_the_real_run_folder_name(capsys):
    from simulation.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "runs/<time>-<dataset>-<model>-<key family>" in " ".join(text.split())


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_resuming_from_a_damaged_checkpoint_is_one_clear_error_naming_the_file(tmp_path, damage):
    from simulation.errors import UsageError

    with pytest.raises(SystemExit):
        run_in_process(tmp_path, 2, rounds=2, stop_after_round=1)
    checkpoint = tmp_path / "run" / "mple" / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UsageError, match=f"checkpoint {checkpoint} is truncated or damaged") as raised:
        run_in_process(tmp_path, 2, rounds=2)
    assert "\n" not in str(raised.value)
