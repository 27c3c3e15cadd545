"""The wire protocol between the ServerApp and the holders: record names, what a holder is told, what it may reply.

Both apps import this module, and the server's audit (server.audit) checks every message against it. A holder gets
only its slice of the experiment (`HolderSettings`), validated once on arrival: no output paths, no Ray address, no
strategy arguments, no test hooks, and nothing from which its secrets could be derived.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from flwr.app import ArrayRecord
from torch import nn

from simulation.config import ExperimentConfig, check_choice, check_holder_settings
from simulation.errors import UsageError

VARIANTS = ("mple", "baseline")

# Records of a message's RecordDict.
ARRAYS = "arrays"  # the strategy's shared backbone entries (both ways)
CONFIG = "config"  # the strategy's ConfigRecord, with the entries below added by the server
METRICS = "metrics"  # a holder's reply metrics
FIRST_LAYER = "first-layer"  # the frozen first layer C (server to holder)
INITIAL_LOCAL = "initial-local"  # initial values of the entries that stay with the holders (server to holder)
HOLDER_INFO = "holder"  # which holder replies (holder to server)
SERVER_TO_HOLDER = frozenset({ARRAYS, CONFIG, FIRST_LAYER, INITIAL_LOCAL})
HOLDER_TO_SERVER = frozenset({ARRAYS, METRICS, HOLDER_INFO})

# Entries of the server's ConfigRecord.
SETTINGS = "holder-settings"  # HolderSettings as JSON
SERVER_ROUND = "server-round"
ACTION = "action"  # query messages: "identify" or "align"
PLAIN_ORDER = "plain-order"  # align: the arrays sent are in the plain channel order
SPLIT = "split"  # evaluate: "test" (the holder's own) or "global" (the official test split)
QUERY_ACTIONS = ("identify", "align")
SPLITS = ("test", "global")

# What a reply may carry: metric names per message kind, and the holder record. Metric names are snake_case, as in
# metrics.json, the CSV and the plots; the strategies are built to weight by NUM_EXAMPLES and read QFedAvg's TRAIN_LOSS.
NUM_EXAMPLES = "num_examples"
TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
VAL_ACCURACY = "val_accuracy"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
DP_EPSILON = "dp_epsilon"  # --dp holder: the epsilon the holder has spent so far in this run (at the run's delta)
DP_NOISE = "dp_noise"  # --dp holder: the noise multiplier it trained with (calibrated to --dp-epsilon, or --dp-noise)
TRAIN_METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, VAL_ACCURACY, NUM_EXAMPLES, DP_EPSILON, DP_NOISE)
EVALUATE_METRICS = (EVAL_LOSS, EVAL_ACCURACY, NUM_EXAMPLES)
HOLDER_ID = "holder-id"


@dataclass(frozen=True)
class ReplySchema:
    """What a holder's reply to one kind of message may carry: the shared arrays it was sent (or none), and
    metrics of these names only, each one number."""

    arrays: bool
    metrics: tuple[str, ...]


def reply_schema(message) -> ReplySchema:
    """The schema of the reply to `message` (a train, evaluate or query message of the server)."""
    kind = str(message.metadata.message_type).split(".")[0]
    if kind == "train":
        return ReplySchema(True, TRAIN_METRICS)
    if kind == "evaluate":
        return ReplySchema(False, EVALUATE_METRICS)
    action = str(message.content[CONFIG].get(ACTION, "")) if CONFIG in message.content else ""
    return ReplySchema(action == "align", ())


@dataclass(frozen=True)
class HolderSettings:
    """What a holder needs to know of the experiment: where its data is in the placement, the model, the key
    family it is asked for (it checks that against its own floor), how to train, and its resources."""

    variant: str
    dataset: str
    data_dir: str | None
    image_size: int | None
    holders: int
    partition: str
    test_fraction: float
    public_fraction: float
    seed: int  # the data placement's seed (public), never the holders' secrets
    model: str
    key_family: str
    block_size: int | None
    key_entries: str
    key_padding: str
    shuffle: str
    augment: bool
    batch_size: int
    rounds: int  # a target epsilon is spread over the run's rounds
    local_epochs: int
    lr: float
    momentum: float
    weight_decay: float
    dp: str | None
    dp_noise: float
    dp_clip: float
    dp_epsilon: float | None
    dp_delta: float
    cpus_per_holder: float
    gpus_per_holder: float
    holder_cache: int

    @classmethod
    def from_config(cls, config: ExperimentConfig, variant: str) -> "HolderSettings":
        values = {name: getattr(config, name) for name in HOLDER_FIELDS if name not in ("variant", "augment")}
        return cls(variant=variant, augment=config.use_augmentation, **values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HolderSettings":
        """Parse and validate what the server sent; anything unexpected is refused."""
        try:
            values = json.loads(text)
        except (TypeError, ValueError):
            raise UsageError("the server's holder settings are not JSON; the ServerApp and ClientApp versions differ")
        if not isinstance(values, dict) or set(values) != set(HOLDER_FIELDS):
            given = set(values) if isinstance(values, dict) else set()
            raise UsageError(f"the server's holder settings have unexpected fields {sorted(given ^ set(HOLDER_FIELDS))}; "
                             "the ServerApp and ClientApp versions differ")
        return cls(**values).validate()

    def validate(self) -> "HolderSettings":
        check_choice("variant", self.variant, VARIANTS)
        check_holder_settings(self)
        if not isinstance(self.augment, bool):
            raise UsageError(f"holder setting augment must be true or false, got {self.augment!r}")
        for name in ("dataset", "partition"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"holder setting {name} must be a string, got {getattr(self, name)!r}")
        return self


HOLDER_FIELDS = tuple(field.name for field in dataclasses.fields(HolderSettings))


def module_record(module: nn.Module) -> ArrayRecord:
    """A module's whole state (the first layer C) as it travels."""
    return ArrayRecord({name: value.detach().cpu() for name, value in module.state_dict().items()})
