"""A grid that delivers messages to the real ClientApp in this process: the real apps and strategies, without
starting Ray (which costs ~15 s per run). Engine tests in test_simulation.py use the real Ray backend."""

from __future__ import annotations

import itertools
from copy import deepcopy
import traceback

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as default_client_app
from clients.client_app import build_client_app
from clients.floor import SecurityFloor
from server.server_app import ServerSettings, VariantRun
from simulation.config import build_config
from simulation.run import holder_side
from simulation.run_folder import prepare_run_dir


class InProcessGrid(Grid):
    def __init__(self, num_holders: int, node_config: dict | None = None, client_app=default_client_app):
        self.client_app = client_app
        # Messages stamp the sending task's identity; the engine sets it for a real ServerApp.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self._contexts = {
            1000 + holder: Context(
                run_id=1,
                node_id=1000 + holder,
                node_config={"partition-id": holder, "num-partitions": num_holders, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for holder in range(num_holders)
        }
        self._ids = itertools.count(1)
        self._waiting: dict[str, Message] = {}
        self.log: list[tuple[Message, Message]] = []

    def set_run(self, run) -> None:  # pragma: no cover - nothing to set
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, content, message_type, dst_node_id, group_id="", ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return list(self._contexts)

    def push_messages(self, messages):
        """Deliver each message to its holder's ClientApp now; the replies wait for pull_messages."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            context = self._contexts[message.metadata.dst_node_id]
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # the engine turns a ClientApp exception into an error reply, so do we
                reason = "".join(traceback.format_exception_only(error)).strip()
                reply = Message(Error(code=0, reason=reason), reply_to=message)
            # Copies: some strategies empty the replies' arrays while aggregating them.
            self.log.append((_snapshot(message), _snapshot(reply)))
            self._waiting[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._waiting.pop(message_id) for message_id in list(message_ids) if message_id in self._waiting]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _snapshot(message: Message) -> Message:
    if message.has_error():
        return message
    copy = Message(RecordDict(), dst_node_id=0, message_type=message.metadata.message_type)
    copy.__dict__["_content"] = deepcopy(message.content)
    return copy


def run_in_process(tmp_path, holders: int = 3, *, holder_seed: int | None = 0, variant: str = "mple",
                   holder_floor: tuple | None = None, nodes: int | None = None, grid_type=InProcessGrid,
                   node_config: dict | None = None, **settings):
    """A whole variant run through the real ServerApp, strategies and ClientApp, in this process; the holders' side
    set up as `simulation.run` sets it up (their folders, their secrets from `holder_seed`, their floor
    `(families, min_block_size)`, the failure hook); `nodes` connects fewer holders than the run expects; `node_config` is every node's extra node config (what a SuperNode names itself); `grid_type` is an InProcessGrid that stages a failure."""
    stop = settings.pop("stop_after_round", None)
    config = build_config({"holders": holders, "rounds": 2, "pretrain_epochs": 1, **settings})
    run_dir = prepare_run_dir(config, tmp_path / "run", exist_ok=True)
    floor = SecurityFloor() if holder_floor is None else SecurityFloor(*holder_floor)
    side = holder_side(config, run_dir, holder_seed, floor)
    grid = grid_type(holders if nodes is None else nodes, node_config, client_app=build_client_app(side))
    run = VariantRun(grid, ServerSettings(config, run_dir, variant=variant, progress=lambda line: None,
                                          stop_after_round=stop))
    return run.run(), grid, run
