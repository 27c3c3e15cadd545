"""A variant's state after each completed round, written atomically and owner-only so that `--resume` continues
from it. Nothing is pickled: the file holds tensors, numbers and strings (read back with `weights_only`), and the
strategy's state is its attributes that are numbers, strings, arrays or ArrayRecords, set back on a strategy the run
builds anew (whatever else a strategy holds, such as functions, comes from its constructor)."""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from simulation.errors import UsageError
from simulation.files import atomic_torch_save, atomic_write_json
from simulation.run_folder import CHECKPOINT_FILE, PROGRESS_FILE


@dataclass
class RoundState:
    """What the round loop carries from one round to the next."""

    arrays: ArrayRecord  # the global shared backbone
    strategy: object
    sampling: random.Random
    round: int = 0
    rows: list[dict] = field(default_factory=list)
    aligned: bool = False  # the initial backbone is in the federation's channel order


CHECKPOINT_ENTRIES = {"round", "arrays", "rows", "sampling", "strategy_tensors", "strategy_values", "aligned"}


class Checkpoints:
    """One variant's checkpoint.pt and progress.json in its folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / CHECKPOINT_FILE

    def save(self, state: RoundState) -> None:
        tensors, values = strategy_state(state.strategy)
        atomic_torch_save({
            "round": state.round,
            "arrays": state.arrays.to_torch_state_dict(),
            "rows": json.dumps(state.rows),
            "sampling": json.dumps(state.sampling.getstate()),
            "strategy_tensors": tensors,
            "strategy_values": json.dumps(values),
            "aligned": state.aligned,
        }, self.path, private=True)
        atomic_write_json(self.folder / PROGRESS_FILE, {"rounds": state.rows})

    def read(self) -> dict:
        """The checkpoint's contents: tensors, numbers and strings only; a damaged file is one clear error."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or not CHECKPOINT_ENTRIES <= set(saved):
                raise ValueError("entries missing")
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise UsageError(f"checkpoint {self.path} is truncated or damaged ({first_line}); the rounds after the "
                             "last good checkpoint are lost: restore the file from a backup, or start a new run "
                             "folder") from None
        return saved

    def restore(self, state: RoundState) -> bool:
        """Bring `state` (with a freshly built strategy) to the last completed round, if there is one."""
        if not self.path.exists():
            return False
        saved = self.read()
        state.round = saved["round"]
        state.arrays = ArrayRecord(saved["arrays"])
        state.rows = json.loads(saved["rows"])
        version, internal, gauss = json.loads(saved["sampling"])
        state.sampling.setstate((version, tuple(internal), gauss))
        restore_strategy_state(state.strategy, saved["strategy_tensors"], json.loads(saved["strategy_values"]))
        state.aligned = saved["aligned"]
        return True


def strategy_state(strategy: Strategy, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """The strategy's state (nested strategies included, as DP wrappers hold one): tensors by name, and for each
    attribute its plain value or how its tensors are laid out."""
    tensors, values = {}, {}
    for name, value in vars(strategy).items():
        key = prefix + name
        if isinstance(value, Strategy):
            inner_tensors, inner_values = strategy_state(value, key + ".")
            tensors.update(inner_tensors)
            values[key] = {"kind": "strategy", "values": inner_values}
        elif value is None or isinstance(value, (bool, int, float, str)):
            values[key] = {"kind": "value", "value": value}
        elif isinstance(value, ArrayRecord):
            values[key] = {"kind": "arrays", "names": list(value.keys())}
            tensors.update({f"{key}/{item}": array for item, array in value.to_torch_state_dict().items()})
        elif isinstance(value, np.ndarray):
            values[key] = {"kind": "ndarray"}
            tensors[key] = torch.from_numpy(np.array(value))
        elif isinstance(value, dict) and value and all(isinstance(item, np.ndarray) for item in value.values()):
            values[key] = {"kind": "ndarray-dict", "names": [str(item) for item in value]}
            tensors.update({f"{key}/{item}": torch.from_numpy(np.array(array)) for item, array in value.items()})
        elif isinstance(value, list) and value and all(isinstance(item, np.ndarray) for item in value):
            values[key] = {"kind": "ndarray-list", "length": len(value)}
            tensors.update({f"{key}/{index}": torch.from_numpy(np.array(array)) for index, array in enumerate(value)})
        elif _is_plain(value):
            values[key] = {"kind": "value", "value": value}
    return tensors, values


def restore_strategy_state(strategy: Strategy, tensors: dict[str, torch.Tensor], values: dict, prefix: str = "") -> None:
    for key, entry in values.items():
        name = key[len(prefix):]
        kind = entry["kind"]
        if kind == "strategy":
            restore_strategy_state(getattr(strategy, name), tensors, entry["values"], key + ".")
            continue
        if kind == "value":
            value = entry["value"]
        elif kind == "arrays":
            value = ArrayRecord({item: tensors[f"{key}/{item}"] for item in entry["names"]})
        elif kind == "ndarray":
            value = tensors[key].numpy()
        elif kind == "ndarray-dict":
            value = {item: tensors[f"{key}/{item}"].numpy() for item in entry["names"]}
        else:
            value = [tensors[f"{key}/{index}"].numpy() for index in range(entry["length"])]
        setattr(strategy, name, value)


def _is_plain(value) -> bool:
    """JSON that reads back as the same value (lists and string-keyed dicts of numbers and strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(item, str) and _is_plain(inner) for item, inner in value.items())
    return False
