"""The server's view of the federation, audited: every message in and out is checked against what may cross.

It also makes sampling reproducible: node ids are random per run, so it lists nodes in holder order.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from simulation.protocol import ARRAYS, HOLDER_ID, HOLDER_INFO, HOLDER_TO_SERVER, SERVER_TO_HOLDER


class AuditViolation(RuntimeError):
    """Something that must stay with a holder was about to cross to the server (or the reverse)."""


class AuditGrid(Grid):
    """Wraps the real grid: checks each message's records, records each reply per holder and round."""

    def __init__(self, grid: Grid, shared_names: Iterable[str]):
        self._grid = grid
        self.shared_names = set(shared_names)
        self.holder_of: dict[int, int] = {}
        self.replies: list[Message] = []
        self.sent = 0
        self.received = 0

    # -- delegation
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        return sorted(nodes, key=lambda node: (self.holder_of.get(node, len(nodes) + 1), node))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            self._check_outgoing(message)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            self._check_incoming(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for message in messages:
            self._check_outgoing(message)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self._check_incoming(reply)
        self.replies = replies
        return replies

    # -- checks
    def _check_outgoing(self, message: Message) -> None:
        self.sent += 1
        _only(message.content, SERVER_TO_HOLDER, "server-to-holder message")

    def _check_incoming(self, reply: Message) -> None:
        self.received += 1
        if reply.has_error():
            return
        _only(reply.content, HOLDER_TO_SERVER, "holder reply")
        if ARRAYS in reply.content:
            names = set(reply.content[ARRAYS].keys())
            if not names <= self.shared_names:
                raise AuditViolation(
                    f"a holder replied with non-shared entries {sorted(names - self.shared_names)[:5]}; "
                    "holder-local layers must never leave the holder"
                )
        holder = reply.content.get(HOLDER_INFO)
        if holder is not None:
            self.holder_of[reply.metadata.src_node_id] = int(holder[HOLDER_ID])

    def holder_id(self, reply: Message) -> int | None:
        return self.holder_of.get(reply.metadata.src_node_id)


def _only(content: RecordDict, allowed: set[str], what: str) -> None:
    extra = set(content.keys()) - allowed
    if extra:
        raise AuditViolation(f"{what} carries {sorted(extra)}, which may not cross between holder and server")
