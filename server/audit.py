"""The server's view of the federation, audited: every message in and out is checked against what may cross.

It also makes sampling reproducible: node ids are random per run, so it lists nodes in holder order. A holder whose
SuperNode restarts comes back on a new node id; once that node has said which holder it is, the old node is no
longer listed (the SuperLink would list a dead node until its heartbeats run out, a minute in Flower 1.42).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from simulation.profile import timed
from simulation.protocol import (
    ARRAYS,
    HOLDER_ID,
    HOLDER_INFO,
    HOLDER_TO_SERVER,
    METRICS,
    SERVER_TO_HOLDER,
    ReplySchema,
    reply_schema,
)


class AuditViolation(RuntimeError):
    """Something that must stay with a holder was about to cross to the server (or the reverse)."""


class AuditGrid(Grid):
    """Wraps the real grid: checks each message's records, and each reply's contents against what the message it
    answers allows (simulation.protocol.reply_schema): which arrays, with the shapes and dtypes sent; which metric
    names, as plain numbers; the holder record's one field. It records which node is which holder."""

    def __init__(self, grid: Grid, shared_names: Iterable[str]):
        self._grid = grid
        self.shared_names = set(shared_names)
        self.holder_of: dict[int, int] = {}
        self.superseded: set[int] = set()  # nodes whose holder has since replied from a newer node
        self.sent = 0
        self.received = 0
        self._expected: dict[int, tuple[ReplySchema, dict[str, tuple]]] = {}  # by node: what its reply may carry

    # -- delegation
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        nodes = [node for node in self._grid.get_node_ids() if node not in self.superseded]
        return sorted(nodes, key=lambda node: (self.holder_of.get(node, math.inf), node))  # newcomers last

    def unidentified(self) -> list[int]:
        """Connected nodes that have not yet said which holder they are (new, or a holder's restarted node)."""
        return [node for node in self.get_node_ids() if node not in self.holder_of]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        with timed("server", "audit"):
            for message in messages:
                self._check_outgoing(message)
        with timed("server", "push"):
            return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        with timed("server", "audit"):
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
        return replies

    # -- checks
    def _check_outgoing(self, message: Message) -> None:
        self.sent += 1
        _only(message.content, SERVER_TO_HOLDER, "server-to-holder message")
        arrays = message.content.get(ARRAYS)
        shapes = {} if arrays is None else {name: _layout(array) for name, array in arrays.items()}
        self._expected[message.metadata.dst_node_id] = (reply_schema(message), shapes)

    def _check_incoming(self, reply: Message) -> None:
        self.received += 1
        if reply.has_error():
            # An error carries no content. It may come from the SuperLink itself (node 0) for a node that went
            # away, so it is not matched to the node it names as its source.
            return
        expected = self._expected.pop(reply.metadata.src_node_id, None)
        if expected is None:
            raise AuditViolation(f"node {reply.metadata.src_node_id} replied to no message the server sent it")
        schema, sent_shapes = expected
        content = reply.content
        _only(content, HOLDER_TO_SERVER, "holder reply")
        arrays = content.array_records
        if ARRAYS in arrays:
            names = set(arrays[ARRAYS].keys())
            if not names <= self.shared_names:
                raise AuditViolation(
                    f"a holder replied with non-shared entries {sorted(names - self.shared_names)[:5]}; "
                    "holder-local layers must never leave the holder"
                )
            if not schema.arrays or names != set(sent_shapes):
                raise AuditViolation(f"a holder replied with arrays {sorted(names)[:5]} where it was sent "
                                     f"{sorted(sent_shapes)[:5]}; a reply carries back exactly the shared entries sent")
            for name, array in arrays[ARRAYS].items():
                if _layout(array) != sent_shapes[name]:
                    raise AuditViolation(f"a holder replied with {name} of {_layout(array)}, sent as "
                                         f"{sent_shapes[name]}; a reply never reshapes or retypes what it was sent")
        elif schema.arrays:
            raise AuditViolation("a holder's training reply carries no arrays")
        extra_arrays = set(arrays) - {ARRAYS}
        if extra_arrays:
            raise AuditViolation(f"a holder reply carries array records {sorted(extra_arrays)}; only {ARRAYS!r} may")
        metrics = content.metric_records
        if set(metrics) - {METRICS} or content.config_records.keys() - {HOLDER_INFO}:
            raise AuditViolation("a holder reply carries records other than its metrics and holder record")
        if METRICS in metrics:
            record = metrics[METRICS]
            unexpected = set(record.keys()) - set(schema.metrics)
            if unexpected:
                raise AuditViolation(f"a holder reply carries metrics {sorted(unexpected)[:5]}; a reply may carry only "
                                     f"{', '.join(schema.metrics) or 'no metrics'}")
            for name, value in record.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise AuditViolation(f"a holder reply's metric {name} is {type(value).__name__}, not one number")
        holder = content.config_records.get(HOLDER_INFO)
        if holder is not None:
            if set(holder.keys()) != {HOLDER_ID} or isinstance(holder[HOLDER_ID], bool) \
                    or not isinstance(holder[HOLDER_ID], int):
                raise AuditViolation(f"a holder record must hold exactly one integer {HOLDER_ID}, got "
                                     f"{sorted(holder.keys())[:5]}")
            self._identified(reply.metadata.src_node_id, int(holder[HOLDER_ID]))

    def _identified(self, node: int, holder: int) -> None:
        for other, known in self.holder_of.items():
            if known == holder and other != node:
                self.superseded.add(other)
        self.superseded.discard(node)
        self.holder_of[node] = holder

    def holder_id(self, reply: Message) -> int | None:
        return self.holder_of.get(reply.metadata.src_node_id)


def _layout(array) -> tuple:
    return (str(array.dtype), tuple(array.shape))


def _only(content: RecordDict, allowed: set[str], what: str) -> None:
    extra = set(content.keys()) - allowed
    if extra:
        raise AuditViolation(f"{what} carries {sorted(extra)}, which may not cross between holder and server")
