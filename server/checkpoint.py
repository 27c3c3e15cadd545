"""A variant's state after each completed round, written atomically so that `--resume` continues from it."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord

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


class Checkpoints:
    """One variant's checkpoint.pt and progress.json in its folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / CHECKPOINT_FILE

    def save(self, state: RoundState) -> None:
        atomic_torch_save({
            "round": state.round,
            "arrays": state.arrays.to_torch_state_dict(),
            "rows": state.rows,
            "sampling": state.sampling.getstate(),
            "strategy": pickle.dumps(state.strategy),
            "aligned": state.aligned,
        }, self.path)
        atomic_write_json(self.folder / PROGRESS_FILE, {"rounds": state.rows})

    def read(self) -> dict:
        """The checkpoint's contents: tensors, numbers and strings only (the strategy stays pickled bytes)."""
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def restore(self, state: RoundState) -> bool:
        """Bring `state` to the last completed round, if there is one."""
        if not self.path.exists():
            return False
        saved = self.read()
        state.round = saved["round"]
        state.arrays = ArrayRecord(saved["arrays"])
        state.rows = saved["rows"]
        state.sampling.setstate(saved["sampling"])
        state.strategy = pickle.loads(saved["strategy"])
        state.aligned = saved["aligned"]
        return True
