"""The server's round loop for one variant: Flower's `Strategy.start` loop, unrolled so that the server can audit
each message, count failures, checkpoint after every round and resume, and sample holders reproducibly."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch import nn

from server.audit import AuditGrid
from server.checkpoint import Checkpoints, RoundState
from server.plan import RunPlan, make_strategy
from simulation.config import HOLDER_DP
from simulation.errors import UsageError
from simulation.profile import timed
from simulation.protocol import (
    ACTION,
    ARRAYS,
    CONFIG,
    DP_EPSILON,
    EVAL_ACCURACY,
    EVAL_LOSS,
    EVALUATE_METRICS,
    FIRST_LAYER,
    INITIAL_LOCAL,
    METRICS,
    NUM_EXAMPLES,
    PLAIN_ORDER,
    SERVER_ROUND,
    SETTINGS,
    SPLIT,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    TRAIN_METRICS,
    HolderSettings,
    module_record,
)
from simulation.seeds import derive_seed

PROGRESS_EVERY_S = 10.0
PULL_INTERVAL_S = 0.02


class RoundLoop:
    """One variant's rounds: sends the holders their work through the audited grid, aggregates with the strategy,
    checkpoints every round, and returns the variant's rounds and final evaluation."""

    def __init__(self, grid: AuditGrid, plan: RunPlan, first: nn.Conv2d, variant: str, checkpoints: Checkpoints, *,
                 progress: Callable[[str], None] = print, stop_after_round: int | None = None):
        self.grid = grid
        self.config = plan.config
        self.checkpoints = checkpoints
        self.progress = progress
        self.stop_after_round = stop_after_round
        self.variant = variant
        self.shared = plan.shared
        self.first_layer = module_record(first)
        self.initial_local = plan.initial_local
        self.settings = HolderSettings.from_config(plan.config, variant).to_json()
        self.state = RoundState(
            arrays=plan.initial_shared,
            strategy=make_strategy(plan.config),
            sampling=random.Random(derive_seed(plan.config.seed, "sampling")),
            aligned=plan.config.shuffle != "federation",
        )

    @property
    def strategy(self):
        return self.state.strategy

    # ------------------------------------------------------------ messages
    def _config(self, **extra) -> ConfigRecord:
        return ConfigRecord({SETTINGS: self.settings, "lr": self.config.lr, **extra})

    def _with_holder_records(self, messages) -> list[Message]:
        messages = list(messages)
        for message in messages:
            message.content[FIRST_LAYER] = self.first_layer
            message.content[INITIAL_LOCAL] = self.initial_local
        return messages

    def _query(self, node_ids, **config) -> list[Message]:
        content = RecordDict({CONFIG: self._config(**{SERVER_ROUND: self.state.round}, **config)})
        messages = [Message(content=content, dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
        if config.get(ACTION) == "align":
            messages = self._with_holder_records(messages)
            content[ARRAYS] = self.state.arrays
        return self._exchange(messages, "replied")

    def _exchange(self, messages: list[Message], done: str) -> list[Message]:
        """Send a round's messages and collect the replies, within --round-timeout; a round that takes long says
        every PROGRESS_EVERY_S how many holders have replied, and how fast."""
        sent = list(self.grid.push_messages(messages))
        position = {message_id: index for index, message_id in enumerate(sent)}
        pending = set(sent)
        started = last_report = time.monotonic()
        deadline = None if self.config.round_timeout is None else started + self.config.round_timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self.grid.pull_messages(sorted(pending, key=position.get)))
            replies += arrived
            pending -= {reply.metadata.reply_to_message_id for reply in arrived}
            now = time.monotonic()
            if not pending or (deadline is not None and now > deadline):
                break
            if now - last_report >= PROGRESS_EVERY_S:
                rate = len(replies) / (now - started)
                self.progress(f"  round {self.state.round}: {len(replies)}/{len(messages)} holders {done} "
                              f"({rate:.2f} holders/s, {now - started:.0f} s)")
                last_report = now
            time.sleep(PULL_INTERVAL_S)
        # In the order sent, whatever order they arrived in: aggregation sums floats, and the sum depends on the order.
        return sorted(replies, key=lambda reply: position[reply.metadata.reply_to_message_id])

    def identify_holders(self) -> None:
        """Wait (at most --connect-timeout) until every holder's node is connected, then learn which node is which
        holder; a federation that stays short is one clear error naming the missing holders."""
        nodes = list(self.grid.get_node_ids())
        deadline = time.monotonic() + self.config.connect_timeout
        while len(nodes) < self.config.holders and time.monotonic() < deadline:
            time.sleep(1)
            nodes = list(self.grid.get_node_ids())
        replies = self._query(nodes, **{ACTION: "identify"})
        failed = [reply for reply in replies if reply.has_error()]
        if failed:
            raise RuntimeError(f"{len(failed)} holder(s) could not identify themselves: {failed[0].error.reason}")
        if len(nodes) < self.config.holders:
            present = {self.grid.holder_id(reply) for reply in replies}
            missing = [holder for holder in range(self.config.holders) if holder not in present]
            raise UsageError(
                f"only {len(nodes)} of {self.config.holders} holders connected within {self.config.connect_timeout:.0f}"
                f" s; missing holder(s) {_listing(missing)}: start one SuperNode per holder (node config "
                f"partition-id={missing[0]} ...), or run with holders={len(nodes)} (flwr run . --run-config "
                f"\"holders={len(nodes)}\", or --holders {len(nodes)})"
            )

    def identify_newcomers(self) -> None:
        """A node that connects after the start (a holder's SuperNode restarted after its machine died) says which
        holder it is before it is sampled; from then on the holder's old node is no longer listed (AuditGrid)."""
        newcomers = self.grid.unidentified()
        if not newcomers:
            return
        for reply in self._query(newcomers, **{ACTION: "identify"}):
            if not reply.has_error():
                self.progress(f"  holder {self.grid.holder_id(reply)} joined on node {reply.metadata.src_node_id}")

    def align_channel_order(self) -> None:
        """With one federation-wide channel order, the initial backbone must be brought into that order once; a
        holder does it. The reply is the server's own initial backbone reindexed by the order, so the server can read
        the order off it exactly (server.attacks.gradient_inversion.order_from_alignment; docs/privacy.md): the
        federation order hides nothing from the server, --shuffle holder keeps the order-sensitive layers local."""
        first = self.grid.get_node_ids()[0]
        (reply,) = self._query([first], **{ACTION: "align", PLAIN_ORDER: True})
        if reply.has_error():
            raise RuntimeError(f"holder could not align the initial backbone: {reply.error.reason}")
        self.state.arrays = reply.content[ARRAYS]
        self.state.aligned = True

    # ------------------------------------------------------------ rounds
    def run(self) -> dict:
        state = self.state
        if self.checkpoints.restore(state):
            self.progress(f"resuming {self.variant} after round {state.round}/{self.config.rounds}")
        with timed("server", "identify and align"):
            self.identify_holders()
            if not state.aligned:
                self.align_channel_order()
        random.setstate(state.sampling.getstate())
        while state.round < self.config.rounds:
            state.round += 1
            started = time.time()
            row = self._train_round()
            row.update(self._evaluate_round())
            row["seconds"] = round(time.time() - started, 3)
            state.rows.append(row)
            state.sampling.setstate(random.getstate())
            with timed("server", "checkpoint"):
                self.checkpoints.save(state)
            self.progress(_progress_line(row, self.config.rounds))
            if self.stop_after_round == state.round:
                raise SystemExit(f"stopped after round {state.round} (as asked)")
        with timed("server", "final evaluation"):
            return {"rounds": state.rows, "final": self._final_evaluation()}

    def _train_round(self) -> dict:
        state = self.state
        self.identify_newcomers()
        with timed("server", "configure"):
            messages = self._with_holder_records(
                self.strategy.configure_train(state.round, state.arrays, self._config(), self.grid)
            )
        with timed("server", "exchange"):
            replies = self._exchange(messages, "trained")
        ok = [reply for reply in replies if not reply.has_error()]
        counted = len(ok) >= (self.config.min_holders or 1)
        if counted:
            with timed("server", "aggregate"):
                arrays, _ = self.strategy.aggregate_train(state.round, ok)
                if arrays is not None:
                    state.arrays = ArrayRecord(valid_backbone(arrays.to_torch_state_dict(), self.shared))
        return {
            "round": state.round,
            "dp_epsilon": self._epsilon_so_far(ok),
            "train_loss": weighted_mean(ok, TRAIN_LOSS),
            "train_accuracy": weighted_mean(ok, TRAIN_ACCURACY),
            "holders_trained": len(ok),
            "train_failures": len(replies) - len(ok) + (len(messages) - len(replies)),
            "counted": counted,
            "failure_reasons": sorted({reply.error.reason.splitlines()[-1][:200] for reply in replies
                                       if reply.has_error()}),
            "per_holder": self._per_holder(ok, TRAIN_METRICS),
        }

    def _epsilon_so_far(self, replies) -> float | None:
        """--dp holder: the largest epsilon any holder has spent so far (a holder's own only grows, and one not
        sampled this round keeps what it had); None without holder DP."""
        if self.config.dp != HOLDER_DP:
            return None
        earlier = [row["dp_epsilon"] for row in self.state.rows if row.get("dp_epsilon") is not None]
        spent = [float(reply.content[METRICS][DP_EPSILON]) for reply in replies if DP_EPSILON in reply.content[METRICS]]
        return max(earlier + spent, default=None)

    def _evaluate_round(self, **config) -> dict:
        state = self.state
        self.identify_newcomers()
        with timed("server", "configure"):
            messages = self._with_holder_records(
                self.strategy.configure_evaluate(state.round, state.arrays, self._config(**config), self.grid)
            )
        with timed("server", "exchange"):
            replies = self._exchange(messages, "evaluated")
        ok = [reply for reply in replies if not reply.has_error()]
        # Holders with no test images (--test-fraction 0, or two images each) reply with 0 examples, and Flower's
        # aggregation would divide by their total.
        if weighted_mean(ok, EVAL_LOSS) is not None and config.get(SPLIT) != "global":
            self.strategy.aggregate_evaluate(state.round, ok)
        return {
            "loss": weighted_mean(ok, EVAL_LOSS),
            "accuracy": weighted_mean(ok, EVAL_ACCURACY),
            "holders_evaluated": len(ok),
            "evaluate_failures": len(messages) - len(ok),
            "per_holder_eval": self._per_holder(ok, EVALUATE_METRICS[:2]),
        }

    def _final_evaluation(self) -> dict:
        """Every evaluated holder scores the final model on the dataset's official test split, morphed with its
        own key, or on its own site's part of it where the split is by site (DataPlacement.official_test); the
        federated rounds use the holders' own test splits."""
        result = self._evaluate_round(**{SPLIT: "global"})
        rows = self.state.rows
        last = rows[-1] if rows else {}
        return {
            "accuracy": result["accuracy"],
            "loss": result["loss"],
            "holders": result["holders_evaluated"],
            "per_holder": result["per_holder_eval"],
            "federated_accuracy": last.get("accuracy"),
            "federated_loss": last.get("loss"),
            "first_round_train_loss": rows[0]["train_loss"] if rows else None,
            "rounds": len(rows),
            **({"dp_epsilon": last.get("dp_epsilon"), "dp_delta": self.config.dp_delta}
               if self.config.dp == HOLDER_DP else {}),
        }

    def _per_holder(self, replies, names) -> dict[str, dict]:
        table = {}
        for reply in replies:
            metrics = reply.content[METRICS]
            table[str(self.grid.holder_id(reply))] = {name: metrics[name] for name in names if name in metrics}
        return dict(sorted(table.items(), key=lambda item: int(item[0])))


def valid_backbone(state: dict, names) -> dict:
    """float32 in the shared order. Server-side optimisers (FedAdam, FedYogi, FedAdagrad) and DP noise treat
    BatchNorm running variances as parameters and can push them below zero, which BatchNorm turns into NaN:
    a variance is never negative, so clamp it."""
    valid = {}
    for name in names:
        value = state[name].float()
        if name.endswith("running_var"):
            value = value.clamp_min(0.0)
        valid[name] = value
    return valid


def weighted_mean(replies: list[Message], name: str) -> float | None:
    """The replies' metric `name`, weighted by their NUM_EXAMPLES; None without replies or examples."""
    total = sum(float(reply.content[METRICS][NUM_EXAMPLES]) for reply in replies)
    if not replies or total == 0:
        return None
    return sum(
        float(reply.content[METRICS][name]) * float(reply.content[METRICS][NUM_EXAMPLES]) for reply in replies
    ) / total


def _listing(ids: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _progress_line(row: dict, rounds: int) -> str:
    def show(value, pattern):
        return "-" if value is None else pattern.format(value)

    failures = row["train_failures"] + row["evaluate_failures"]
    return (
        f"round {row['round']:>3}/{rounds}  train loss {show(row['train_loss'], '{:.4f}')}  "
        f"eval loss {show(row['loss'], '{:.4f}')}  accuracy {show(row['accuracy'], '{:.3f}')}  "
        f"holders {row['holders_trained']} trained / {row['holders_evaluated']} evaluated"
        f"{f'  failures {failures}' if failures else ''}{'' if row['counted'] else '  (round not counted)'}"
        f"  {row['seconds']:.1f}s"
    )
