"""The data holder's Flower ClientApp: trains and evaluates the shared backbone on morphed data.

The training code below only ever sees what `clients.holder.Holder` hands it: morphed batches and a frozen
AugConv. It replies with the shared backbone entries only; holder-local entries stay in the holder's folder.

Everything secret or holder-specific comes from the holder's side, never from the server: its folder and secrets
(node config `holder-dir`, `holder-seed`, `federation-secret`, `dataset` on a SuperNode; in a simulation the
launcher's `HolderSide`, which travels inside the ClientApp to the holders' processes and nowhere else). From the
server it takes only its slice of the settings (`simulation.protocol.HolderSettings`), validated on arrival.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from clients.floor import SecurityFloor
from clients.holder import Holder, HolderCache, conv_fingerprint, holder_folder_name
from clients.secrets import HolderProvision, holder_secrets
from simulation.config import HOLDER_DP
from simulation.models import SplitModel, build_model, permute_first_layer_channels
from simulation.placement import placement_for
from simulation.protocol import (
    ACTION,
    ARRAYS,
    CONFIG,
    DP_EPSILON,
    DP_NOISE,
    EVAL_ACCURACY,
    EVAL_LOSS,
    FIRST_LAYER,
    HOLDER_ID,
    HOLDER_INFO,
    INITIAL_LOCAL,
    METRICS,
    NUM_EXAMPLES,
    PLAIN_ORDER,
    SERVER_ROUND,
    SETTINGS,
    SPLIT,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    VAL_ACCURACY,
    HolderSettings,
)
from simulation.profile import timed
from simulation.training import evaluate, pick_device, train_epochs, train_epochs_dp

FLOOR_NODE_CONFIG = {"key-families", "min-block-size"}


class InjectedFailure(RuntimeError):
    """Raised on purpose by holders listed in --fail-holders, to test how rounds survive failures."""


@dataclass(frozen=True)
class HolderSide:
    """What the launcher tells the holders and nobody else: where their folders are (`holders_root/holder-NNNN`),
    what their secrets start from (`provision`: the holder seed, or a federation secret), the weakest key they accept
    (`floor`), and which holders fail on purpose (a test hook)."""

    holders_root: str | None = None
    provision: HolderProvision | None = None
    floor: SecurityFloor = SecurityFloor()
    fail_holders: tuple[int, ...] = ()
    fail_stage: str = "train"


class _ProcessState:
    """What one worker process keeps between messages: holders (bounded), model skeletons, parsed settings."""

    def __init__(self):
        self.holders: HolderCache | None = None
        self.skeletons: dict[str, SplitModel] = {}
        self.settings: dict[str, HolderSettings] = {}
        self.threads_set = False


_STATE = _ProcessState()


def settings_of(message: Message) -> HolderSettings:
    """The server's settings for this holder, validated once per distinct text."""
    text = str(message.content[CONFIG][SETTINGS])
    if text not in _STATE.settings:
        _STATE.settings[text] = HolderSettings.from_json(text)
    return _STATE.settings[text]


def _skeleton(settings: HolderSettings, image_shape, num_classes: int) -> SplitModel:
    """One model per process and experiment; every call overwrites its whole state, so it can be reused."""
    dp_sgd = settings.dp == HOLDER_DP  # as the server's initial model (server.first_layer.initial_model)
    name = json.dumps([settings.model, list(image_shape), num_classes, dp_sgd])
    if name not in _STATE.skeletons:
        _STATE.skeletons[name] = build_model(
            settings.model, in_channels=image_shape[0], num_classes=num_classes, image_size=tuple(image_shape[1:]),
            dp_sgd=dp_sgd,
        )
    return _STATE.skeletons[name]


def holder_folder(context: Context, side: HolderSide, holder_id: int) -> Path:
    """The holder's own folder, chosen on the holder's side only: node config `holder-dir` (a SuperNode), the
    launcher's holders root (a simulation), else a folder of this run under the holder's own Flower home."""
    given = str(context.node_config.get("holder-dir", ""))
    if given:
        return Path(given).expanduser()
    if side.holders_root:
        return Path(side.holders_root) / holder_folder_name(holder_id)
    flower_home = Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()
    return flower_home / "mple-holders" / f"run-{context.run_id}" / holder_folder_name(holder_id)


class HolderJob:
    """One message's work for one holder: assembles the holder's model from what the server sent."""

    def __init__(self, message: Message, context: Context, side: HolderSide):
        with timed("holder", "settings"):
            settings = settings_of(message)
            self.settings = settings
            self.side = side
            self.server_round = int(message.content[CONFIG][SERVER_ROUND])
            self.message_type = message.metadata.message_type
            self.holder_id = int(context.node_config["partition-id"])
            if not _STATE.threads_set:
                torch.set_num_threads(max(1, int(settings.cpus_per_holder)))
                _STATE.threads_set = True
            if _STATE.holders is None:
                _STATE.holders = HolderCache(settings.holder_cache)
            self.device = pick_device(settings.gpus_per_holder)
            dataset = placement_for(settings).dataset
            self.model = _skeleton(settings, dataset.image_shape, dataset.num_classes)
        with timed("holder", "decode"):
            self.model.first.load_state_dict(message.content[FIRST_LAYER].to_torch_state_dict())
            self.received = message.content[ARRAYS].to_torch_state_dict()
        with timed("holder", "holder set-up and cache"):
            home = holder_folder(context, side, self.holder_id)
            own_data = str(context.node_config.get("dataset", "")) or None
            cache_key = (str(home), own_data, settings, self.holder_id, conv_fingerprint(self.model.first))
            self.holder: Holder = _STATE.holders.get(cache_key, lambda: self._open_holder(context, home, own_data))
        with timed("holder", "local state and state dicts"):
            self.backbone = self.model.backbone.to(self.device)
            self._assemble(message)

    def _open_holder(self, context: Context, home: Path, own_data: str | None) -> Holder:
        node = context.node_config
        if self.side.provision is not None and not {"holder-seed", "federation-secret"} & set(node):
            secrets = self.side.provision.secrets_for(home, self.holder_id)
        else:
            secrets = holder_secrets(home, self.holder_id, holder_seed=node.get("holder-seed"),
                                     federation_secret=str(node.get("federation-secret", "")) or None)
        floor = SecurityFloor.from_node_config(node) if FLOOR_NODE_CONFIG & set(node) else self.side.floor
        return Holder(self.holder_id, self.settings, home, secrets, self.model.first, self.device, own_data=own_data,
                      floor=floor)

    def _assemble(self, message: Message) -> None:
        """Global entries from the message, holder-local ones from the holder's folder (or their initial values),
        each brought into the holder's channel order."""
        plain_order = bool(message.content[CONFIG].get(PLAIN_ORDER, False))
        # Training starts from the local entries of earlier rounds; evaluation uses those this round trained too.
        training = self.message_type == MessageType.TRAIN
        local = self.holder.load_local_state(self.server_round if training else self.server_round + 1)
        initial_local = message.content[INITIAL_LOCAL].to_torch_state_dict()
        in_plain = dict(self.received) if plain_order else {}
        in_holder_order = {} if plain_order else dict(self.received)
        if local is None:
            in_plain.update(initial_local)
        else:
            in_holder_order.update(local)
        if in_plain:
            self.backbone.load_state_dict(in_plain, strict=False)
            permute_first_layer_channels(self.model, self.holder.order)
        self.backbone.load_state_dict(in_holder_order, strict=False)

    def reply_arrays(self) -> ArrayRecord:
        state = self.backbone.state_dict()
        return ArrayRecord({name: state[name].detach().cpu() for name in self.received})

    def save_local(self) -> None:
        """The backbone entries the server did not send (holder-local layers), kept in the holder's folder; a run
        without any writes nothing."""
        local = {name: value for name, value in self.backbone.state_dict().items() if name not in self.received}
        if local:
            self.holder.save_local_state(self.server_round, local)

    def evaluate_test_split(self) -> tuple[float, float]:
        """(loss, accuracy) on the holder's own test split. The model evaluated after round r (global arrays of
        round r, local entries as of round r) is exactly the one round r+1's training starts from, so a training
        message reuses that result instead of evaluating again."""
        model_round = self.server_round - 1 if self.message_type == MessageType.TRAIN else self.server_round
        cached = self.holder.test_evaluation_of(model_round)
        if cached is not None:
            return cached
        loss, accuracy, _ = evaluate(self.holder.first, self.backbone, self.holder.batches("test"))
        self.holder.remember_test_evaluation(model_round, loss, accuracy)
        return loss, accuracy

    def fail_if_injected(self, stage: str) -> None:
        if self.holder_id in self.side.fail_holders and self.side.fail_stage == stage:
            raise InjectedFailure(f"holder {self.holder_id} failed on purpose during {stage} (--fail-holders)")

    def local_seed(self, purpose: str) -> int:
        return self.holder.local_seed(purpose, self.server_round)


def _reply(message: Message, arrays: ArrayRecord | None, metrics: dict, holder_id: int) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), HOLDER_INFO: ConfigRecord({HOLDER_ID: holder_id})})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content=content, reply_to=message)


def _clip_if_client_dp(message: Message, context: Context, call_next):
    """Flower's client-side fixed clipping, applied when the run asks for client-side DP. The mod expects the
    strategy's records only, so the holder's own records step aside while it runs."""
    if settings_of(message).dp != "client":
        return call_next(message, context)
    extras = {name: message.content[name] for name in (FIRST_LAYER, INITIAL_LOCAL) if name in message.content}
    for name in extras:
        del message.content[name]

    def with_extras(inner: Message, inner_context: Context) -> Message:
        for name, record in extras.items():
            inner.content[name] = record
        return call_next(inner, inner_context)

    return fixedclipping_mod(message, context, with_extras)


@timed("holder", "train message")
def train(message: Message, context: Context, side: HolderSide) -> Message:
    job = HolderJob(message, context, side)
    job.fail_if_injected("train")
    holder, settings, config = job.holder, job.settings, message.content[CONFIG]
    with timed("holder", "compute"):
        val_loss, val_accuracy = job.evaluate_test_split()
    torch.manual_seed(job.local_seed("dropout"))
    proximal_mu = float(config.get("proximal-mu", 0.0))
    common = dict(epochs=settings.local_epochs, lr=float(config.get("lr", settings.lr)), momentum=settings.momentum,
                  weight_decay=settings.weight_decay, proximal_mu=proximal_mu,
                  anchor=job.received if proximal_mu > 0 else None)
    privacy = {}
    if settings.dp == HOLDER_DP:
        plan = holder.dp_plan
        batches = holder.poisson_batches(plan.sample_rate, plan.steps_per_epoch, seed=job.local_seed("batches"))
        loss, accuracy, _, steps = train_epochs_dp(
            holder.first, job.backbone, batches, noise_multiplier=plan.noise_multiplier, clip=plan.clip,
            expected_batch_size=plan.expected_batch_size, noise_seed=job.local_seed("dp-noise"), **common)
        ledger = holder.privacy
        ledger.record(job.server_round, plan, steps)
        privacy = {DP_EPSILON: ledger.epsilon(plan.delta), DP_NOISE: plan.noise_multiplier}
    else:
        with timed("holder", "compute"):
            batches = holder.batches("train", shuffle_seed=job.local_seed("batches"))
            loss, accuracy, _ = train_epochs(holder.first, job.backbone, batches, **common)
    with timed("holder", "local state and state dicts"):
        job.save_local()
    metrics = {
        NUM_EXAMPLES: holder.num_examples("train"),
        TRAIN_LOSS: loss,
        TRAIN_ACCURACY: accuracy,
        VAL_ACCURACY: _finite(val_accuracy),
        **privacy,
    }
    with timed("holder", "reply"):
        return _reply(message, job.reply_arrays(), metrics, job.holder_id)


@timed("holder", "evaluate message")
def evaluate_holder(message: Message, context: Context, side: HolderSide) -> Message:
    job = HolderJob(message, context, side)
    job.fail_if_injected("evaluate")
    split = str(message.content[CONFIG].get(SPLIT, "test"))
    with timed("holder", "compute"):
        if split == "test":
            loss, accuracy = job.evaluate_test_split()
            examples = job.holder.num_examples("test")
        else:
            loss, accuracy, examples = evaluate(job.holder.first, job.backbone, job.holder.batches(split))
    metrics = {NUM_EXAMPLES: examples, EVAL_LOSS: _finite(loss), EVAL_ACCURACY: _finite(accuracy)}
    with timed("holder", "reply"):
        return _reply(message, None, metrics, job.holder_id)


def query(message: Message, context: Context, side: HolderSide) -> Message:
    """`identify`: tell the server which holder this node is, so that it samples holders reproducibly.
    `align`: bring the initial backbone into the federation's channel order (see server.rounds)."""
    action = str(message.content[CONFIG][ACTION])
    holder_id = int(context.node_config["partition-id"])
    if action == "identify":
        return Message(content=RecordDict({HOLDER_INFO: ConfigRecord({HOLDER_ID: holder_id})}), reply_to=message)
    if action == "align":
        job = HolderJob(message, context, side)
        content = RecordDict({ARRAYS: job.reply_arrays(), HOLDER_INFO: ConfigRecord({HOLDER_ID: holder_id})})
        return Message(content=content, reply_to=message)
    raise ValueError(f"unknown query action {action!r}")


def build_client_app(side: HolderSide = HolderSide()) -> ClientApp:
    """The ClientApp with the launcher's holder-side settings (a simulation), or none (a SuperNode, which names its
    folder and secrets in its node config)."""
    client_app = ClientApp()
    client_app.train(mods=[_clip_if_client_dp])(partial(train, side=side))
    client_app.evaluate()(partial(evaluate_holder, side=side))
    client_app.query()(partial(query, side=side))
    return client_app


def _finite(value: float) -> float:
    return 0.0 if value != value else float(value)


app = build_client_app()
