"""Beyond one machine: holders' own folders and data from the node config, the Flower App definition, an existing
Ray cluster, and Flower's Deployment Engine (SuperLink + SuperNodes + `flwr run`), for real on the loopback address.

Every process a test starts runs in its own process group and is stopped by its own id in a `finally`, and each
uses fresh ports and its own Flower home / Ray temp folder, so that nothing left over can capture a run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

from clients.holder import KEY_FILE, holder_home, load_own_data
from server.server_app import PROJECT_ROOT, ServerSettings, VariantRun, settings_from_run_config
from simulation.config import build_config
from simulation.data import load_dataset
from simulation.deploy import (
    FINISHED,
    DeploymentError,
    LocalDeployment,
    free_ports,
    holder_data_npz,
    main,
    preset_toml,
    start_process,
    stop_process,
    tool,
)
from simulation.errors import UsageError
from simulation.placement import placement_for
from simulation.protocol import HolderSettings
from simulation.run_folder import METRICS_FILE, prepare_run_dir

from .inprocess import InProcessGrid, run_in_process

TINY = {"holders": 2, "rounds": 1, "pretrain_epochs": 1}


def write_npz(path: Path, train_images, train_labels, test_images, test_labels) -> Path:
    np.savez(path, train_images=train_images, train_labels=train_labels, test_images=test_images,
             test_labels=test_labels)
    return path


# ---------------------------------------------------------------- a holder's own folder and data
def test_holders_use_the_folder_and_data_their_node_config_names(tmp_path):
    config = build_config(TINY)
    run_dir = prepare_run_dir(config, tmp_path / "run")
    digits = placement_for(config).dataset
    own = write_npz(tmp_path / "hospital-0.npz", digits.test.images[:30, 0], digits.test.labels[:30],
                    digits.test.images[30:42, 0], digits.test.labels[30:42])
    grid = InProcessGrid(2)
    folders = [tmp_path / "disk-0" / "mple", tmp_path / "disk-1" / "mple"]
    for (_, context), folder in zip(sorted(grid._contexts.items()), folders):
        context.node_config["holder-dir"] = str(folder)
        context.node_config["holder-seed"] = 5
    grid._contexts[1000].node_config["dataset"] = f"npz:{own}"
    metrics = VariantRun(grid, ServerSettings(config, run_dir, progress=lambda line: None)).run()

    for folder in folders:
        assert (folder / KEY_FILE).is_file() and list(folder.glob("augconv-*.pt"))
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not holder_home(run_dir, 0).exists() and not holder_home(run_dir, 1).exists()
    trained = metrics["rounds"][0]["per_holder"]
    assert trained["0"]["num_examples"] == 30  # its own file's train split, not its partition
    assert trained["1"]["num_examples"] == len(placement_for(config).holder_train[1])
    evaluated = [reply.content["metrics"]["num_examples"] for message, reply in grid.log
                 if message.metadata.message_type == MessageType.EVALUATE and reply.content["holder"]["holder-id"] == 0]
    assert evaluated[0] == 12  # its own file's test split
    assert evaluated[-1] == len(digits.test)  # the final score stays on the official test split


def test_a_holder_file_of_another_shape_or_more_classes_is_refused(tmp_path):
    config = build_config(TINY)
    digits = placement_for(config).dataset
    images = np.zeros((4, 10, 10), dtype=np.uint8)
    wrong_shape = write_npz(tmp_path / "a.npz", images, np.zeros(4, np.int64), images, np.zeros(4, np.int64))
    with pytest.raises(UsageError, match="shape"):
        load_own_data(f"npz:{wrong_shape}", HolderSettings.from_config(config, "mple"), digits)
    images = digits.test.images[:4, 0]
    too_many = write_npz(tmp_path / "b.npz", images, np.full(4, 12), images, np.zeros(4, np.int64))
    with pytest.raises(UsageError, match="label 12"):
        load_own_data(f"npz:{too_many}", HolderSettings.from_config(config, "mple"), digits)


def test_split_data_files_hold_exactly_each_holders_partition(tmp_path):
    config = build_config({**TINY, "holders": 3})
    federation = placement_for(config)
    for holder in range(3):
        path = tmp_path / f"holder-{holder}.npz"
        path.write_bytes(holder_data_npz(config, holder))
        own = load_dataset(f"npz:{path}")
        train, test = federation.holder_train[holder], federation.holder_test[holder]
        assert np.array_equal(own.train.images, federation.dataset.train.images[train])
        assert np.array_equal(own.train.labels, federation.dataset.train.labels[train])
        assert np.array_equal(own.test.images, federation.dataset.train.images[test])


# ---------------------------------------------------------------- configuration handed to the ServerApp
def test_preset_written_for_the_serverapp_gives_back_the_same_config(tmp_path):
    config = build_config({"holders": 4, "strategy": "fedprox", "strategy_args": {"proximal_mu": 0.1},
                           "local_layers": ["classifier.3"], "dp": "server", "dp_noise": 0.5, "image_size": 16})
    preset = tmp_path / "experiment.toml"
    preset.write_text(preset_toml(config))
    assert build_config({}, preset) == config


def run_config_context(**run_config) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_run_config_names_a_preset_and_empty_values_keep_the_presets(tmp_path):
    app_config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    preset = tmp_path / "preset.toml"
    preset.write_text('holders = 7\nrounds = 4\nmodel = "cnn"\n')
    out = tmp_path / "run"
    settings = settings_from_run_config(run_config_context(**{**app_config, "preset": str(preset),
                                                               "out": str(out), "rounds": 3}))
    assert settings.run_dir == out and (out / "config.json").is_file()
    assert settings.config.rounds == 3  # given
    assert settings.config.holders == app_config["holders"]  # the app's default beats the preset
    assert settings.config.model == "cnn" and settings.variant == "mple"
    with pytest.raises(UsageError, match="variant"):
        settings_from_run_config(run_config_context(**{**app_config, "out": str(out), "variant": "both"}))


def test_a_relative_preset_resolves_against_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    presets = sorted((PROJECT_ROOT / "configs").glob("*.toml"))
    if not presets:
        pytest.skip("no preset in configs/")
    name = f"configs/{presets[0].name}"
    settings = settings_from_run_config(run_config_context(preset=name, out=str(tmp_path / "run"), holders=2))
    expected = build_config({"holders": 2}, presets[0])
    assert settings.config == expected


def test_every_preset_builds_and_the_hardened_one_keeps_what_the_measurements_chose():
    presets = {path.stem: build_config({}, path) for path in sorted((PROJECT_ROOT / "configs").glob("*.toml"))}
    assert {"default", "hardened", "pneumonia"} <= set(presets)
    hardened, pneumonia = presets["hardened"], presets["pneumonia"]
    assert (hardened.key_family, hardened.shuffle) == ("dense", "holder")  # docs/privacy.md, the strongest configuration
    same_federation = ("dataset", "holders", "rounds", "local_epochs", "batch_size", "lr", "partition", "public_fraction")
    assert all(getattr(hardened, name) == getattr(pneumonia, name) for name in same_federation)


def test_the_project_is_a_valid_flower_app_whose_bundle_holds_the_code_only():
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, _ = load_and_validate(PROJECT_ROOT / "pyproject.toml", check_module=True)
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.server_app:app", "clientapp": "clients.client_app:app"}
    assert "federations" not in config["tool"]["flwr"]  # flwr 1.42 would move it out of pyproject.toml
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(PROJECT_ROOT))).namelist()
    assert {"server/server_app.py", "clients/client_app.py", "simulation/config.py"} <= set(names)
    assert not [name for name in names if name.startswith(("tests/", "runs/", "docs/", "benchmarks/"))]


def test_the_launcher_refuses_options_that_do_not_apply(capsys, tmp_path):
    assert main(["--ray-address", "auto", "--out", str(tmp_path / "run")]) == UsageError.exit_code
    assert main(["--timeout", "0", "--out", str(tmp_path / "run")]) == UsageError.exit_code
    assert capsys.readouterr().err.count("error:") == 2
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- real processes on the loopback address
def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout:.0f} s")


@pytest.fixture
def ray_head(tmp_path):
    """A private one-node Ray cluster with 2 CPUs, as `ray start --head` starts it, on fresh ports."""
    ray = tool("ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="mple-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    ports = free_ports(9)
    command = [ray, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
               "--node-ip-address", "127.0.0.1", "--port", str(ports[0]), "--temp-dir", str(temp_dir),
               "--include-dashboard", "false", "--disable-usage-stats"]
    for flag, port in zip(("--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port",
                           "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                           "--node-manager-port", "--object-manager-port"), ports[1:]):
        command += [flag, str(port)]
    log = tmp_path / "ray-head.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    head = start_process(command, log, env)
    try:
        wait_for(lambda: "Ray runtime started" in log.read_text() or head.poll() is not None, "the Ray head started")
        assert head.poll() is None, log.read_text()[-2000:]
        yield f"127.0.0.1:{ports[0]}", temp_dir
    finally:
        stop_process(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert head.poll() is not None


@pytest.mark.heavy  # 33 s: over the default run's 10 minutes on 2 cores
def test_a_run_joins_an_existing_ray_cluster(tmp_path, ray_head):
    address, temp_dir = ray_head
    out = tmp_path / "run"
    command = [sys.executable, "-m", "simulation.run", "--ray-address", address, "--holders", "2", "--rounds", "1",
               "--pretrain-epochs", "1", "--cpus-per-holder", "1", "--out", str(out)]
    log = tmp_path / "run.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    run = start_process(command, log, env)
    try:
        code = run.wait(timeout=240)
    finally:
        stop_process(run)
    assert code == 0, log.read_text()[-3000:]
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert 0.5 < final["accuracy"] <= 1 and final["holders"] == 2
    # The run's driver and the holders' actors ran on this cluster: their logs are in its session folder.
    logs = temp_dir / "session_latest" / "logs"
    assert list(logs.glob("python-core-driver-*.log"))
    assert any("ClientAppActor" in path.read_text(errors="ignore") for path in logs.glob("worker-*.out"))


@pytest.mark.heavy  # 95 s: the default run took 10 min 22 s in .ci/run; the SuperNode kill-and-restart test runs the same
# processes (SuperLink, a SuperNode per holder, flwr run) and is heavy too
def test_superlink_and_one_supernode_per_holder_run_the_apps(tmp_path):
    config = build_config({**TINY, "shuffle": "holder"})  # no alignment query: one ClientApp process less
    run_dir = prepare_run_dir(config, tmp_path / "run")
    deployment = LocalDeployment(config, run_dir, split_data=True, progress=lambda line: None, stream_logs=False,
                                 holder_seed=3)
    try:
        deployment.start()
        with pytest.raises(DeploymentError, match="finished:failed"):
            deployment.run_variant("neither")  # the ServerApp refuses it: `flwr` exits 0, the status says failed
        metrics = deployment.run_variant("mple", timeout=240)
    finally:
        deployment.stop()
    assert deployment.processes and all(process.poll() is not None for process in deployment.processes)
    assert [row["round"] for row in metrics["rounds"]] == [1]
    assert metrics["rounds"][0]["holders_trained"] == 2 and metrics["final"]["holders"] == 2
    # Same seeds, same numbers: the holders' own files hold their partitions, so the deployment must reproduce
    # the in-process federation exactly.
    reference, _, _ = run_in_process(tmp_path / "reference", **{**TINY, "shuffle": "holder"}, holder_seed=3)
    assert metrics["rounds"][0]["train_loss"] == pytest.approx(reference["rounds"][0]["train_loss"], abs=1e-6)
    # One image either way: the SuperNodes' fresh ClientApp processes and this process can round differently.
    assert metrics["final"]["accuracy"] == pytest.approx(reference["final"]["accuracy"], abs=1 / 500)
    federation = placement_for(config)
    for holder in range(2):
        folder = holder_home(run_dir, holder)
        assert (folder / KEY_FILE).is_file() and (folder / "data.npz").is_file()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        trained = metrics["rounds"][0]["per_holder"][str(holder)]["num_examples"]
        assert trained == len(federation.holder_train[holder])


def _holder_state(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())
            if path.name == KEY_FILE or path.name.startswith(("augconv-", "local-"))}


@pytest.mark.heavy
def test_a_supernode_killed_mid_round_counts_as_failed_and_rejoins_with_its_folder(tmp_path):
    """A holder's machine dies in round 2's training: the round completes without it within --round-timeout, the
    run goes on, and its SuperNode restarted with the same folder comes back on a new node id with the same key,
    AugConv and holder-local layers. Before that, `flwr run` asks for more holders than there are SuperNodes."""
    config = build_config({**TINY, "rounds": 2, "shuffle": "holder", "round_timeout": 25,
                           "local_layers": ["classifier.3"]})
    run_dir = prepare_run_dir(config, tmp_path / "run")
    said: list[str] = []
    deployment = LocalDeployment(config, run_dir, split_data=True, progress=said.append, stream_logs=False,
                                 holder_seed=3)
    supernode_log = deployment.holder_dir(1) / "supernode.log"
    try:
        deployment.start()
        short = deployment.submit("mple", holders=3, connect_timeout=3, out=str(tmp_path / "short"))
        assert deployment.wait(short, timeout=120) == "finished:failed"
        log = (deployment.deploy_dir / f"run-{short}.log").read_text()
        assert "only 2 of 3 holders connected within 3 s; missing holder(s) 2" in log

        run_id = deployment.submit("mple")
        waiting = {}
        waiter = threading.Thread(target=lambda: waiting.update(status=deployment.wait(run_id, timeout=300)))
        waiter.start()
        start = len(supernode_log.read_text())

        def in_round_two_training() -> bool:
            text = supernode_log.read_text()[start:]
            second = text.find("Receiving: train message", text.find("Receiving: train message") + 1)
            return second > 0 and "Start `flwr-clientapp` process" in text[second:]

        wait_for(in_round_two_training, "holder 1 started its ClientApp for round 2's training", timeout=200)
        kept = _holder_state(deployment.holder_dir(1))
        deployment.kill_supernode(1)
        wait_for(lambda: any("SuperNode of holder 1 exited" in line for line in said), "the launcher said so", 10)
        deployment.restart_supernode(1)
        waiter.join(timeout=320)
    finally:
        deployment.stop()
    assert waiting.get("status") == FINISHED, said
    metrics = json.loads((run_dir / "mple" / METRICS_FILE).read_text())
    first, second = metrics["rounds"]
    assert first["holders_trained"] == 2 and first["train_failures"] == 0
    assert second["holders_trained"] == 1 and second["train_failures"] == 1 and set(second["per_holder"]) == {"0"}
    # Identified on its new node before round 2's evaluation, and its dead node no longer sampled.
    assert second["holders_evaluated"] == 2 and second["evaluate_failures"] == 0
    assert metrics["final"]["holders"] == 2 and set(metrics["final"]["per_holder"]) == {"0", "1"}
    assert {"key.mple", "local-mple-r00001.pt"} <= set(kept) and any(name.startswith("augconv-") for name in kept)
    after = _holder_state(deployment.holder_dir(1))
    assert {name: after[name] for name in kept} == kept  # nothing rebuilt or re-drawn: the same key and layers
    assert supernode_log.read_text().count("SuperNode ID:") == 2
