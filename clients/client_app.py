"""The data holder's Flower ClientApp: trains and evaluates the shared backbone on morphed data.

The training code below only ever sees what `clients.holder.Holder` hands it: morphed batches and a frozen
AugConv. It replies with the shared backbone entries only; holder-local entries stay in the holder's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from torch import nn

from clients.holder import Holder, HolderCache, conv_fingerprint, holder_home
from simulation.config import ExperimentConfig
from simulation.federation import derive_seed, federation_for
from simulation.models import SplitModel, build_model, permute_first_layer_channels
from simulation.training import evaluate, pick_device, train_epochs

# Message contents the ServerApp adds next to the strategy's "arrays" and "config".
FIRST_LAYER = "first-layer"
INITIAL_LOCAL = "initial-local"
HOLDER_INFO = "holder"
EXPERIMENT = "experiment"


class InjectedFailure(RuntimeError):
    """Raised on purpose by holders listed in --fail-holders, to test how rounds survive failures."""


class _ProcessState:
    """What one worker process keeps between messages: holders (bounded) and model skeletons."""

    def __init__(self):
        self.holders: HolderCache | None = None
        self.skeletons: dict[str, SplitModel] = {}
        self.threads_set = False


_STATE = _ProcessState()


def experiment_of(message: Message) -> tuple[ExperimentConfig, dict]:
    settings = json.loads(str(message.content["config"][EXPERIMENT]))
    return ExperimentConfig(**settings["config"]), settings


def _skeleton(config: ExperimentConfig, image_shape, num_classes: int) -> SplitModel:
    """One model per process and experiment; every call overwrites its whole state, so it can be reused."""
    name = json.dumps([config.model, list(image_shape), num_classes])
    if name not in _STATE.skeletons:
        _STATE.skeletons[name] = build_model(
            config.model, in_channels=image_shape[0], num_classes=num_classes, image_size=tuple(image_shape[1:])
        )
    return _STATE.skeletons[name]


def holder_folder(context: Context, run_dir: str, holder_id: int) -> Path:
    """The holder's own folder (key, AugConv, local state): node config `holder-dir` on a SuperNode, else the
    holder's folder in the run folder (simulation, where all holders share one machine)."""
    given = str(context.node_config.get("holder-dir", ""))
    return Path(given).expanduser() if given else holder_home(run_dir, holder_id)


class HolderJob:
    """One message's work for one holder: assembles the holder's model from what the server sent."""

    def __init__(self, message: Message, context: Context):
        config, settings = experiment_of(message)
        self.config = config
        self.variant = settings["variant"]
        self.server_round = int(message.content["config"]["server-round"])
        self.message_type = message.metadata.message_type
        self.holder_id = int(context.node_config["partition-id"])
        if not _STATE.threads_set:
            torch.set_num_threads(max(1, int(config.cpus_per_holder)))
            _STATE.threads_set = True
        if _STATE.holders is None:
            _STATE.holders = HolderCache(config.holder_cache)
        self.device = pick_device(config.gpus_per_holder)
        dataset = federation_for(config).dataset
        self.model = _skeleton(config, dataset.image_shape, dataset.num_classes)
        first_state = message.content[FIRST_LAYER].to_torch_state_dict()
        self.model.first.load_state_dict(first_state)
        home = holder_folder(context, settings["run-dir"], self.holder_id)
        own_data = str(context.node_config.get("dataset", "")) or None
        cache_key = (str(home), own_data, self.variant, self.holder_id, conv_fingerprint(self.model.first))
        self.holder: Holder = _STATE.holders.get(
            cache_key,
            lambda: Holder(self.holder_id, config, home, self.model.first, self.variant, self.device,
                           own_data=own_data),
        )
        self.backbone = self.model.backbone.to(self.device)
        self.received = message.content["arrays"].to_torch_state_dict()
        self._assemble(message)

    def _assemble(self, message: Message) -> None:
        """Global entries from the message, holder-local ones from the holder's folder (or their initial values),
        each brought into the holder's channel order."""
        plain_order = bool(message.content["config"].get("plain-order", False))
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
        state = self.backbone.state_dict()
        self.holder.save_local_state(
            self.server_round, {name: value for name, value in state.items() if name not in self.received}
        )

    def evaluate_test_split(self) -> tuple[float, float]:
        """(loss, accuracy) on the holder's own test split. The model evaluated after round r (global arrays of
        round r, local entries as of round r) is exactly the one round r+1's training starts from, so a training
        message reuses that result instead of evaluating again."""
        model_round = self.server_round - 1 if self.message_type == MessageType.TRAIN else self.server_round
        cached = self.holder.test_evaluation
        if cached is not None and cached[0] == model_round:
            return cached[1], cached[2]
        loss, accuracy, _ = evaluate(self.holder.first, self.backbone, self.holder.batches("test"))
        self.holder.test_evaluation = (model_round, loss, accuracy)
        return loss, accuracy

    def fail_if_injected(self, stage: str) -> None:
        if self.holder_id in self.config.fail_holders and self.config.fail_stage == stage:
            raise InjectedFailure(f"holder {self.holder_id} failed on purpose during {stage} (--fail-holders)")

    def batch_seed(self, purpose: str) -> int:
        return derive_seed(self.config.seed, purpose, self.holder_id, self.server_round)


def _reply(message: Message, arrays: ArrayRecord | None, metrics: dict, holder_id: int) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), HOLDER_INFO: ConfigRecord({"holder-id": holder_id})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=message)


def _clip_if_client_dp(message: Message, context: Context, call_next):
    """Flower's client-side fixed clipping, applied when the run asks for client-side DP. The mod expects the
    strategy's records only, so the holder's own records step aside while it runs."""
    config, _ = experiment_of(message)
    if config.dp != "client":
        return call_next(message, context)
    extras = {name: message.content[name] for name in (FIRST_LAYER, INITIAL_LOCAL) if name in message.content}
    for name in extras:
        del message.content[name]

    def with_extras(inner: Message, inner_context: Context) -> Message:
        for name, record in extras.items():
            inner.content[name] = record
        return call_next(inner, inner_context)

    return fixedclipping_mod(message, context, with_extras)


app = ClientApp()


@app.train(mods=[_clip_if_client_dp])
def train(message: Message, context: Context) -> Message:
    job = HolderJob(message, context)
    job.fail_if_injected("train")
    holder = job.holder
    val_loss, val_accuracy = job.evaluate_test_split()
    torch.manual_seed(job.batch_seed("dropout"))
    proximal_mu = float(message.content["config"].get("proximal-mu", 0.0))
    loss, accuracy, _ = train_epochs(
        holder.first,
        job.backbone,
        holder.batches("train", shuffle_seed=job.batch_seed("batches")),
        epochs=job.config.local_epochs,
        lr=float(message.content["config"].get("lr", job.config.lr)),
        momentum=job.config.momentum,
        weight_decay=job.config.weight_decay,
        proximal_mu=proximal_mu,
        anchor=job.received if proximal_mu > 0 else None,
    )
    job.save_local()
    metrics = {
        "num-examples": holder.num_examples("train"),
        "train_loss": loss,
        "train-accuracy": accuracy,
        "val-accuracy": _finite(val_accuracy),
    }
    return _reply(message, job.reply_arrays(), metrics, job.holder_id)


@app.evaluate()
def evaluate_holder(message: Message, context: Context) -> Message:
    job = HolderJob(message, context)
    job.fail_if_injected("evaluate")
    split = str(message.content["config"].get("split", "test"))
    if split == "test":
        loss, accuracy = job.evaluate_test_split()
        examples = job.holder.num_examples("test")
    else:
        loss, accuracy, examples = evaluate(job.holder.first, job.backbone, job.holder.batches(split))
    metrics = {"num-examples": examples, "eval-loss": _finite(loss), "eval-accuracy": _finite(accuracy)}
    return _reply(message, None, metrics, job.holder_id)


@app.query()
def query(message: Message, context: Context) -> Message:
    """`identify`: tell the server which holder this node is, so that it samples holders reproducibly.
    `align`: bring the initial backbone into the federation's channel order (see ServerApp)."""
    action = str(message.content["config"]["action"])
    holder_id = int(context.node_config["partition-id"])
    if action == "identify":
        return Message(content=RecordDict({HOLDER_INFO: ConfigRecord({"holder-id": holder_id})}), reply_to=message)
    if action == "align":
        job = HolderJob(message, context)
        content = RecordDict({"arrays": job.reply_arrays(), HOLDER_INFO: ConfigRecord({"holder-id": holder_id})})
        return Message(content=content, reply_to=message)
    raise ValueError(f"unknown query action {action!r}")


def _finite(value: float) -> float:
    return 0.0 if value != value else float(value)


def first_layer_record(conv: nn.Conv2d) -> ArrayRecord:
    return ArrayRecord({name: value.detach().cpu() for name, value in conv.state_dict().items()})


__all__ = ["app", "holder_home", "first_layer_record", "InjectedFailure"]
