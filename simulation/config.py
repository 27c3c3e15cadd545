"""One experiment's settings: defaults, TOML presets, command-line overrides, validation."""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.keys import ENTRY_DISTRIBUTIONS, FAMILIES
from clients.secrets import SHUFFLE_MODES
from simulation.data import named_sites, parse_partition
from simulation.errors import UsageError
from simulation.models import MODEL_NAMES

UPDATE_DP_MODES = ("server", "client")  # Flower's fixed-clipping wrappers on whole backbone updates
HOLDER_DP = "holder"  # DP-SGD at each holder (Opacus): per-sample clipping, noise, an accountant
DP_MODES = (*UPDATE_DP_MODES, HOLDER_DP)
HOLDER_DP_CLIP = 1.0  # --dp holder's default per-sample clipping norm (update clipping's is 10)
KEY_PADDING_MODES = ("none", "conv")


@dataclass
class ExperimentConfig:
    """Everything that defines a run. Field names are the TOML keys; flags use dashes instead of underscores."""

    holders: int = 10
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    partition: str = "iid"
    test_fraction: float = 0.2
    public_fraction: float = 0.1
    augment: bool | None = None
    model: str = "cnn"
    key_family: str = "repeated"
    block_size: int | None = None
    key_entries: str = "uniform"
    key_padding: str = "none"
    shuffle: str = "federation"
    first_layer: str = "pretrain"
    pretrain_epochs: int = 3
    strategy: str = "fedavg"
    strategy_args: dict[str, Any] = field(default_factory=dict)
    local_layers: list[str] = field(default_factory=list)
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_holders: int | None = None
    dp: str | None = None
    dp_noise: float = 0.0
    dp_clip: float = 10.0
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    fail_holders: list[int] = field(default_factory=list)
    fail_stage: str = "train"
    cpus_per_holder: float = 1.0
    gpus_per_holder: float = 0.0
    ray_address: str | None = None
    connect_timeout: float = 120.0
    round_timeout: float | None = None
    holder_cache: int = 16
    seed: int = 0
    baseline: bool = False
    out: str | None = None

    def validate(self) -> "ExperimentConfig":
        check_holder_settings(self)
        check_positive_int("pretrain-epochs", self.pretrain_epochs)
        check_number_in("fraction-train", self.fraction_train, 0.0, 1.0, lower_open=True)
        check_number_in("fraction-evaluate", self.fraction_evaluate, 0.0, 1.0)
        check_choice("fail-stage", self.fail_stage, ("train", "evaluate"))
        check_positive_number("connect-timeout", self.connect_timeout)
        if self.round_timeout is not None:
            check_positive_number("round-timeout", self.round_timeout)
        if self.min_holders is not None:
            check_positive_int("min-holders", self.min_holders)
            if self.min_holders > self.holders:
                raise UsageError(
                    f"--min-holders {self.min_holders} exceeds --holders {self.holders}; lower it or add holders"
                )
        kind, _, path = self.first_layer.partition(":")
        if kind not in ("pretrain", "random", "file") or (kind == "file") != bool(path):
            raise UsageError(
                f"--first-layer must be pretrain, random or file:PATH, got {self.first_layer!r}"
            )
        if kind == "file" and not Path(path).expanduser().is_file():
            raise UsageError(f"first-layer file {path} does not exist; give the path of a .pt checkpoint")
        if kind == "pretrain" and self.public_fraction <= 0:
            raise UsageError("--first-layer pretrain needs a public split: set --public-fraction above 0")
        if self.dp == HOLDER_DP and self.strategy == "qfedavg":
            raise UsageError("--strategy qfedavg weights each update by the holder's training loss, which DP-SGD does "
                             "not privatise, so --dp holder's epsilon would not cover the model; use another strategy")
        for holder in self.fail_holders:
            if isinstance(holder, bool) or not isinstance(holder, int) or not 0 <= holder < self.holders:
                raise UsageError(
                    f"--fail-holders lists holder {holder!r}; holder ids are 0..{self.holders - 1}"
                )
        if not isinstance(self.strategy_args, dict):
            raise UsageError("strategy args must be a table of KEY = VALUE pairs")
        if not isinstance(self.local_layers, list) or not all(isinstance(name, str) for name in self.local_layers):
            raise UsageError("local-layers must be a list of backbone parameter name prefixes")
        return self

    @property
    def use_augmentation(self) -> bool:
        if self.augment is not None:
            return self.augment
        return "cifar" in self.dataset.lower()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls(**json.loads(text))


def check_holder_settings(settings) -> None:
    """The checks of the settings a holder receives too (an ExperimentConfig, or simulation.protocol's
    HolderSettings as it arrives at the holder)."""
    for name in ("holders", "rounds", "local_epochs", "batch_size", "holder_cache"):
        check_positive_int(name.replace("_", "-"), getattr(settings, name))
    check_non_negative_int("seed", settings.seed)
    check_positive_number("lr", settings.lr)
    check_number_in("momentum", settings.momentum, 0.0, 1.0, upper_open=True)
    check_number_in("weight-decay", settings.weight_decay, 0.0, float("inf"))
    check_number_in("test-fraction", settings.test_fraction, 0.0, 1.0, upper_open=True)
    check_number_in("public-fraction", settings.public_fraction, 0.0, 1.0, upper_open=True)
    check_number_in("cpus-per-holder", settings.cpus_per_holder, 0.0, float("inf"), lower_open=True)
    check_number_in("gpus-per-holder", settings.gpus_per_holder, 0.0, float("inf"))
    check_choice("model", settings.model, MODEL_NAMES)
    check_choice("key-family", settings.key_family, FAMILIES)
    check_choice("key-entries", settings.key_entries, ENTRY_DISTRIBUTIONS)
    check_choice("key-padding", settings.key_padding, KEY_PADDING_MODES)
    check_choice("shuffle", settings.shuffle, SHUFFLE_MODES)
    parse_partition(settings.partition)
    for name in ("block_size", "image_size"):
        if getattr(settings, name) is not None:
            check_positive_int(name.replace("_", "-"), getattr(settings, name))
    if settings.dp is not None:
        check_choice("dp", settings.dp, DP_MODES)
        check_number_in("dp-noise", settings.dp_noise, 0.0, float("inf"))
        check_positive_number("dp-clip", settings.dp_clip)
    check_dp_budget(settings)


def check_dp_budget(settings) -> None:
    """--dp holder needs a noise multiplier or a target epsilon (one of them), and a delta in (0, 1)."""
    if settings.dp != HOLDER_DP:
        if settings.dp_epsilon is not None:
            raise UsageError("--dp-epsilon is a budget for DP-SGD at the holders; add --dp holder (or drop it)")
        return
    check_number_in("dp-delta", settings.dp_delta, 0.0, 1.0, lower_open=True, upper_open=True)
    if settings.dp_epsilon is not None:
        check_positive_number("dp-epsilon", settings.dp_epsilon)
        if settings.dp_noise > 0:
            raise UsageError("--dp holder takes --dp-noise or a target --dp-epsilon, not both; the holders calibrate "
                             "the noise to the epsilon themselves")
    elif settings.dp_noise <= 0:
        raise UsageError("--dp holder needs --dp-noise above 0 (a noise multiplier, e.g. 1.0) or a target --dp-epsilon "
                         "(e.g. 8); without noise no epsilon holds")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a preset: top-level keys are config fields (dashes or underscores); a [strategy] table may hold
    `name` and `args`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; see configs/ for presets")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"config file {path} is not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    strategy = raw.pop("strategy", None)
    if isinstance(strategy, dict):
        if "name" in strategy:
            values["strategy"] = strategy.pop("name")
        values["strategy_args"] = dict(strategy.pop("args", {}))
        if strategy:
            raise UsageError(f"config file {path}: [strategy] takes only 'name' and 'args', got {sorted(strategy)}")
    elif strategy is not None:
        values["strategy"] = strategy
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f"did you mean {close[0].replace('_', '-')!r}? " if close else ""
            valid = ", ".join(sorted(field.replace("_", "-") for field in FIELD_NAMES if field != "out"))
            raise UsageError(f"config file {path}: unknown setting {key!r}; {hint}the settings are {valid}, and a "
                             "[strategy] table with name and args")
        values[name] = value
    return values


def build_config(overrides: dict[str, Any], preset: str | Path | None = None) -> ExperimentConfig:
    """Defaults, then the preset, then explicit overrides (None means 'not given'). Under --partition natural the
    number of holders, unless given, is the data's number of sites; under --dp holder the clipping norm, unless
    given, is HOLDER_DP_CLIP."""
    values = load_toml(preset) if preset else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    defaults = ExperimentConfig()
    for name, value in values.items():
        expected = type(getattr(defaults, name))
        if isinstance(value, int) and not isinstance(value, bool) and expected is float:
            values[name] = float(value)
        elif expected in (int, float, str, list, dict) and not _is_type(value, expected):
            raise UsageError(f"setting {name.replace('_', '-')} must be {expected.__name__}, got {value!r}")
    if values.get("dp") == HOLDER_DP and "dp_clip" not in values:
        values["dp_clip"] = HOLDER_DP_CLIP  # per-sample gradients are clipped, not whole updates
    if "holders" not in values and parse_partition(values.get("partition", defaults.partition))[0].name == "natural":
        values["holders"] = len(named_sites(values.get("dataset", defaults.dataset))) or defaults.holders
    return ExperimentConfig(**values).validate()


def _is_type(value, expected) -> bool:
    return isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--{name} must be a positive integer, got {value!r}")


def check_non_negative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--{name} must be a non-negative integer, got {value!r}")


def check_positive_number(name, value):
    check_number_in(name, value, 0.0, float("inf"), lower_open=True)


def check_number_in(name, value, low, high, *, lower_open=False, upper_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"--{name} must be a number, got {value!r}")
    too_low = value <= low if lower_open else value < low
    too_high = value >= high if upper_open else value > high
    if too_low or too_high or value != value:
        left, right = "(" if lower_open else "[", ")" if upper_open else "]"
        raise UsageError(f"--{name} must lie in {left}{low}, {high}{right}, got {value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise UsageError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
