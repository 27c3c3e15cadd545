"""Holders on GPUs, scheduled by Ray, checked without a GPU: a private Ray with two logical GPUs, and Flower's Ray
engine given the resources `simulation.run` gives it (simulation.run.backend_config). A probe ClientApp reports
which GPU Ray gave its actor and when it worked; the holders' own code refuses a GPU grant that torch cannot see
(tests/test_training.py), so the probe stands in for them here."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from simulation.config import build_config
from simulation.run import RayInstance, backend_config

WORK_S = 1.5
probe_client = ClientApp()
probe_server = ServerApp()
REPLIES: list[dict] = []
ERRORS: list[BaseException] = []


@probe_client.train()
def _work(message: Message, context) -> Message:
    started = time.time()
    time.sleep(float(message.content["config"]["seconds"]))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    metrics = {"started": started, "ended": time.time(), "pid": os.getpid(),
               "gpus": len(visible.split(",")) if visible else 0, "gpu": int(visible.split(",")[0]) if visible else -1}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


@probe_server.main()
def _send_work(grid, context) -> None:
    try:
        deadline = time.monotonic() + 60
        while len(nodes := list(grid.get_node_ids())) < 8 and time.monotonic() < deadline:  # registering
            time.sleep(0.1)
        messages = [Message(RecordDict({"config": ConfigRecord({"seconds": WORK_S})}), dst_node_id=node,
                            message_type=MessageType.TRAIN) for node in nodes]
        for reply in grid.send_and_receive(messages):
            assert not reply.has_error(), reply.error.reason
            REPLIES.append(dict(reply.content["metrics"]))
    except BaseException as error:  # Flower's engine would only log it
        ERRORS.append(error)
        raise


def most_at_once(windows: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.heavy
# Ray warns, on an init that names GPUs, that a later version will stop setting CUDA_VISIBLE_DEVICES for tasks that
# ask for none; no task here asks for none.
@pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")
def test_half_a_gpu_per_holder_runs_four_holders_at_once_on_two_gpus_each_actor_on_its_own():
    from flwr.simulation import run_simulation

    config = build_config({"holders": 8, "gpus_per_holder": 0.5, "cpus_per_holder": 1})
    instance = RayInstance(build_config({}))  # a private folder, and the cleaner that kills its every process
    temp = instance.temp
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)  # the actors import this module
    try:
        # 8 logical CPUs: the CPUs allow 8 holders at once, so only the GPUs can hold them to 4.
        ray.init(address="local", num_cpus=8, num_gpus=2, _temp_dir=str(temp), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
        REPLIES.clear()
        ERRORS.clear()
        run_simulation(server_app=probe_server, client_app=probe_client, num_supernodes=8,
                       backend_config=backend_config(config))
    finally:
        os.environ.pop("PYTHONPATH") if previous is None else os.environ.update(PYTHONPATH=previous)
        instance.stop()
    assert not temp.exists()
    assert not ERRORS and len(REPLIES) == 8
    assert most_at_once([(reply["started"], reply["ended"]) for reply in REPLIES]) == 4
    assert all(reply["gpus"] == 1 for reply in REPLIES)  # each actor sees exactly one device
    by_actor = {}
    for reply in REPLIES:
        by_actor.setdefault(reply["pid"], set()).add(reply["gpu"])
    assert len(by_actor) == 4 and all(len(gpus) == 1 for gpus in by_actor.values())
    placed = sorted(gpu for (gpu,) in by_actor.values())
    assert placed == [0, 0, 1, 1]  # two half-GPU holders per GPU
