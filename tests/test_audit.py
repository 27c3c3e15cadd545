"""The server's audit of every message (server.audit.AuditGrid): what a reply may carry, checked by content, and
which node is which holder, also when a holder comes back on a new node."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from server.audit import AuditGrid, AuditViolation

from .inprocess import InProcessGrid, run_in_process


def planted_replies():
    """A training message of two shared entries, and replies that smuggle a key's 64 entries out in every place a
    reply has: a local entry, an extra array, inside the arrays sent, in the metrics, in the holder record."""
    InProcessGrid(1)  # sets the task identity that messages need outside a Flower runtime
    key = torch.rand(64)
    sent = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    message = Message(RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({"lr": 0.1})}),
                      dst_node_id=1000, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = "x"
    metrics = {"num_examples": 3, "train_loss": 0.5, "train_accuracy": 0.5, "val_accuracy": 0.5}

    def reply(arrays=sent, metric_values=metrics, holder={"holder-id": 0}, extra=None):
        content = RecordDict({"arrays": ArrayRecord(dict(arrays)), "metrics": MetricRecord(metric_values),
                              "holder": ConfigRecord(holder)})
        for name, record in (extra or {}).items():
            content[name] = record
        return Message(content, reply_to=message)

    return message, {
        "local entry": (reply(arrays={**sent, "features.1.weight": key}), "non-shared"),
        "key in place of a shared entry": (reply(arrays={"a": key, "b": sent["b"]}), "reshapes"),
        "extra array record": (reply(extra={"keys": ArrayRecord({"a": key})}), "may not cross"),
        "key in the metrics": (reply(metric_values={**metrics, **{f"k{i}": float(v) for i, v in enumerate(key)}}),
                               "carries metrics"),
        "key as a metric list": (reply(metric_values={**metrics, "train_loss": key.tolist()}), "not one number"),
        "key in the holder record": (reply(holder={"holder-id": 0, "key": key.tolist()}), "exactly one integer"),
        "holder id as text": (reply(holder={"holder-id": "0"}), "exactly one integer"),
        "holder id as a fraction": (reply(holder={"holder-id": 0.5}), "exactly one integer"),
        "a shared entry retyped": (reply(arrays={"a": sent["a"].double(), "b": sent["b"]}), "retypes"),
        "a shared entry left out": (reply(arrays={"a": sent["a"]}), "exactly the shared entries sent"),
        "key as arrays named metrics": (reply(extra={"metrics": ArrayRecord({"a": key})}), "array records"),
        "key as metrics named holder": (reply(extra={"holder": MetricRecord({"k": 1.0})}), "other than its metrics"),
        "key as config named metrics": (reply(extra={"metrics": ConfigRecord({"k": key.tolist()})}),
                                        "other than its metrics"),
        "honest": (reply(), None),
    }


@pytest.mark.parametrize("case", ["local entry", "key in place of a shared entry", "extra array record",
                                  "key in the metrics", "key as a metric list", "key in the holder record",
                                  "holder id as text", "holder id as a fraction", "a shared entry retyped",
                                  "a shared entry left out", "key as arrays named metrics",
                                  "key as metrics named holder", "key as config named metrics", "honest"])
def test_audit_checks_what_a_reply_carries_not_only_its_record_names(case):
    message, replies = planted_replies()
    planted, refusal = replies[case]
    audit = AuditGrid(InProcessGrid(1), shared_names={"a", "b"})
    audit._check_outgoing(message)
    if refusal is None:
        audit._check_incoming(planted)
        assert audit.holder_of == {1000: 0}
    else:
        with pytest.raises(AuditViolation, match=refusal):
            audit._check_incoming(planted)


class Relay:
    """The grid under the audit: it accepts every push, has nothing to pull, answers `send_and_receive` with
    `replies` and keeps what it was sent."""

    def __init__(self, replies=()):
        self.replies = list(replies)

    def push_messages(self, messages):
        return ["x" for _ in messages]

    def pull_messages(self, message_ids):
        return []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent, self.timeout = list(messages), timeout
        return self.replies


def test_the_audit_times_its_checks_apart_from_the_push_under_the_names_the_benchmark_reads(tmp_path, monkeypatch):
    """benchmarks.simulation separates the server's audit from its push by these names (MPLE_PROFILE)."""
    from simulation.profile import PROFILE_ENV, read_profile

    message, _ = planted_replies()
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profile.jsonl"))
    audit = AuditGrid(Relay(), shared_names={"a", "b"})
    assert list(audit.push_messages([message])) == ["x"] and list(audit.pull_messages(["x"])) == []
    assert [(line["side"], line["phase"]) for line in read_profile(tmp_path / "profile.jsonl")] == [
        ("server", "audit"), ("server", "push"), ("server", "audit")]


@pytest.mark.parametrize("case", ["key in the metrics", "honest"])
def test_send_and_receive_checks_what_goes_out_and_what_comes_back(case):
    message, replies = planted_replies()
    planted, refusal = replies[case]

    grid = Relay([planted])
    audit = AuditGrid(grid, shared_names={"a", "b"})
    if refusal is None:
        assert audit.send_and_receive([message], timeout=5.0) == [planted]
        assert grid.sent == [message] and grid.timeout == 5.0 and audit.holder_of == {1000: 0}
    else:
        with pytest.raises(AuditViolation, match=refusal):
            audit.send_and_receive([message])
    with pytest.raises(AuditViolation, match="may not cross"):
        audit.send_and_receive([replies["extra array record"][0]])


def test_an_evaluation_reply_carries_no_arrays_and_the_audit_counts_what_crossed():
    message, replies = planted_replies()
    evaluate = Message(RecordDict({"config": ConfigRecord({"lr": 0.1}), "arrays": message.content["arrays"]}),
                       dst_node_id=1000, message_type=MessageType.EVALUATE)
    evaluate.metadata.__dict__["_message_id"] = "e"
    audit = AuditGrid(InProcessGrid(1), shared_names={"a", "b"})
    audit._check_outgoing(evaluate)
    carrying = Message(RecordDict({"arrays": ArrayRecord(dict(message.content["arrays"].to_torch_state_dict())),
                                   "metrics": MetricRecord({"num_examples": 3, "eval_loss": 0.1,
                                                            "eval_accuracy": 0.5})}), reply_to=evaluate)
    with pytest.raises(AuditViolation, match="exactly the shared entries sent"):
        audit._check_incoming(carrying)
    audit._check_outgoing(message)
    audit._check_incoming(replies["honest"][0])
    assert (audit.sent, audit.received) == (2, 2)


def test_audit_refuses_records_a_message_may_not_carry_and_replies_to_nothing():
    message, replies = planted_replies()
    audit = AuditGrid(InProcessGrid(1), shared_names={"a", "b"})
    with pytest.raises(AuditViolation, match="may not cross"):
        audit._check_outgoing(Message(RecordDict({"key": ArrayRecord()}), dst_node_id=1, message_type="query"))
    with pytest.raises(AuditViolation, match="no message"):
        audit._check_incoming(replies["honest"][0])


def identified(audit: AuditGrid, node: int, holder: int) -> None:
    """`node` answers a query of the server's with the holder record of `holder`."""
    query = Message(RecordDict({"config": ConfigRecord({"action": "identify"})}), dst_node_id=node,
                    message_type=MessageType.QUERY)
    query.metadata.__dict__["_message_id"] = f"q{node}"
    audit._check_outgoing(query)
    reply = Message(RecordDict({"holder": ConfigRecord({"holder-id": holder})}), reply_to=query)
    reply.metadata.__dict__["_src_node_id"] = node
    audit._check_incoming(reply)


class Nodes(InProcessGrid):
    def __init__(self, nodes):
        super().__init__(0)
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_a_holder_back_on_a_new_node_replaces_its_old_node():
    grid = Nodes([1000, 1001])
    audit = AuditGrid(grid, shared_names={"a"})
    identified(audit, 1000, 0)
    identified(audit, 1001, 1)
    assert audit.get_node_ids() == [1000, 1001] and audit.unidentified() == []
    grid.nodes = [1001, 2001, 1000]  # holder 1's machine restarted; the SuperLink still lists its dead node
    assert audit.get_node_ids() == [1000, 1001, 2001] and audit.unidentified() == [2001]
    identified(audit, 2001, 1)
    assert audit.get_node_ids() == [1000, 2001] and audit.unidentified() == []
    assert audit.holder_of[2001] == 1


def test_nodes_are_listed_in_holder_order_whatever_their_ids_newcomers_last():
    grid = Nodes([1000, 5000])
    audit = AuditGrid(grid, shared_names={"a"})
    identified(audit, 5000, 0)
    identified(audit, 1000, 1)
    assert audit.get_node_ids() == [5000, 1000]
    grid.nodes = [10, 1000, 5000]
    assert audit.get_node_ids() == [5000, 1000, 10] and audit.unidentified() == [10]
    identified(audit, 2000, 3)  # holder 2's node is gone: holder ids reach past the number of nodes listed
    grid.nodes = [10, 1000, 2000]
    assert audit.get_node_ids() == [1000, 2000, 10]


def test_a_node_that_claims_its_holder_back_replaces_the_newer_one():
    grid = Nodes([1000, 2000])
    audit = AuditGrid(grid, shared_names={"a"})
    identified(audit, 1000, 1)
    identified(audit, 2000, 1)
    assert audit.get_node_ids() == [2000]
    identified(audit, 1000, 1)
    assert audit.get_node_ids() == [1000]


def test_an_error_reply_from_the_superlink_for_a_node_that_went_away_is_not_a_violation():
    message, _ = planted_replies()
    audit = AuditGrid(InProcessGrid(1), shared_names={"a", "b"})
    audit._check_outgoing(message)
    unavailable = Message(Error(code=5, reason="node unavailable"), reply_to=message)
    unavailable.metadata.__dict__["_src_node_id"] = 0  # the SuperLink answers for the node
    audit._check_incoming(unavailable)
    assert audit.received == 1 and audit.holder_of == {}


class HolderRestartsInRoundTwo(InProcessGrid):
    """Holder 1's machine dies when round 2's training reaches it (that message and any later one to its node are
    never answered) and comes back as node 2001 with its folder; node 1001 stays listed, as a dead node does on a
    SuperLink until its heartbeats run out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dead: int | None = None
        self.sent_to: list[tuple[str, int]] = []

    def push_messages(self, messages):
        ids = []
        for message in messages:
            kind, node = str(message.metadata.message_type), message.metadata.dst_node_id
            if kind == MessageType.TRAIN and node == 1001 and (kind, node) in self.sent_to:
                old = self._contexts[1001]
                self._contexts[2001] = type(old)(run_id=1, node_id=2001, node_config=old.node_config,
                                                 state=RecordDict(), run_config={})
                self.dead = 1001
            self.sent_to.append((kind, node))
            if node == self.dead:
                message.metadata.__dict__["_message_id"] = f"lost{next(self._ids)}"
                ids.append(message.metadata.message_id)
            else:
                ids += super().push_messages([message])
        return ids


def test_a_holder_whose_node_dies_mid_round_counts_as_failed_and_rejoins_on_its_new_node(tmp_path):
    metrics, grid, _ = run_in_process(tmp_path, holders=2, rounds=2, round_timeout=1.0, shuffle="holder",
                                      grid_type=HolderRestartsInRoundTwo)
    first, second = metrics["rounds"]
    assert first["holders_trained"] == 2
    assert second["holders_trained"] == 1 and second["train_failures"] == 1 and set(second["per_holder"]) == {"0"}
    assert second["holders_evaluated"] == 2 and second["evaluate_failures"] == 0
    assert set(second["per_holder_eval"]) == {"0", "1"}
    assert metrics["final"]["holders"] == 2
    queried = [node for kind, node in grid.sent_to if kind == MessageType.QUERY]
    assert queried == [1000, 1001, 2001]  # everyone at the start, then only the newcomer, once
    assert {node for _, node in grid.sent_to[-2:]} == {1000, 2001}  # the dead node is no longer sampled
