"""Record-level differential privacy at a holder (`--dp holder`): DP-SGD's sampling, its noise multiplier and the
accountant of what the holder has spent, kept in the holder's own folder.

Each training step takes every one of the holder's n training images independently with probability q = B / n
(Poisson sampling, B the batch size), which is what the RDP accountant's amplification by sampling assumes; an
epoch is ceil(n / B) such steps. The accountant is Opacus' RDPAccountant, fed the history (noise multiplier, q,
steps) of every round the holder trained; its epsilon at the run's delta is what the holder reports. With a target
epsilon the holder calibrates its own noise multiplier (Opacus' get_noise_multiplier) for rounds x local epochs x
steps per epoch, as if it were sampled every round: a holder sampled less often spends less than the target.

The history lives in `dp-<variant>.json` (JSON, owner-only), one entry per round, so epsilon accumulates across rounds
and survives --resume. A round trained again after a resume replaces its entry: it starts from the same model with
the same holder-side seeds (batches and noise), so it releases the same update again, which costs nothing more.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from simulation.errors import UsageError
from simulation.files import atomic_write_bytes

ACCOUNTANT = "rdp"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DPPlan:
    """How one holder runs DP-SGD: sample rate, steps per local epoch, noise multiplier, clipping norm."""

    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    clip: float
    delta: float
    examples: int

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.examples


def check_delta(delta: float, examples: int) -> None:
    if delta * examples >= 1:
        raise UsageError(f"--dp-delta {delta:g} is not below 1 / {examples} (a holder's training images): a delta that "
                         f"large allows a record to leak outright; use --dp-delta {10 ** math.floor(math.log10(0.1 / examples)):g}")


def dp_plan(settings, examples: int) -> DPPlan:
    """The holder's DP-SGD plan from its settings (simulation.protocol.HolderSettings) and its training images."""
    check_delta(settings.dp_delta, examples)
    sample_rate = min(1.0, settings.batch_size / examples)
    steps_per_epoch = math.ceil(examples / settings.batch_size)
    noise = settings.dp_noise
    if settings.dp_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier  # 3 s of import, only under --dp holder

        steps = settings.rounds * settings.local_epochs * steps_per_epoch
        try:
            with warnings.catch_warnings():  # the search tries large multipliers, whose best RDP order is the largest
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                noise = get_noise_multiplier(target_epsilon=settings.dp_epsilon, target_delta=settings.dp_delta,
                                             sample_rate=sample_rate, steps=steps, accountant=ACCOUNTANT)
        except ValueError:
            raise UsageError(f"--dp-epsilon {settings.dp_epsilon:g} is too small for {steps} DP-SGD steps at sample "
                             f"rate {sample_rate:.3g} (no noise multiplier reaches it); raise it, or lower --rounds or "
                             "--local-epochs") from None
    return DPPlan(sample_rate, steps_per_epoch, float(noise), float(settings.dp_clip), float(settings.dp_delta),
                  examples)


class PrivacyLedger:
    """A holder's accountant history for one variant: {round: (noise multiplier, sample rate, steps)}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rounds: dict[int, tuple[float, float, int]] = {}
        if self.path.exists():
            self.rounds = _read(self.path)

    def record(self, server_round: int, plan: DPPlan, steps: int) -> None:
        # The file is the record: another process (another Ray worker) may have trained this holder since.
        self.rounds = _read(self.path) if self.path.exists() else {}
        self.rounds[int(server_round)] = (plan.noise_multiplier, plan.sample_rate, int(steps))
        record = {"version": FORMAT_VERSION, "accountant": ACCOUNTANT,
                  "rounds": {str(r): list(entry) for r, entry in sorted(self.rounds.items())}}
        atomic_write_bytes(self.path, (json.dumps(record) + "\n").encode(), private=True)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [self.rounds[r] for r in sorted(self.rounds)]

    def epsilon(self, delta: float) -> float:
        """The epsilon spent over every recorded round, at `delta` (Opacus' RDP accountant)."""
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = self.history
        return float(accountant.get_epsilon(delta=delta)) if accountant.history else 0.0


def _read(path: Path) -> dict[int, tuple[float, float, int]]:
    try:
        record = json.loads(path.read_text())
        if record.get("version") != FORMAT_VERSION or record.get("accountant") != ACCOUNTANT:
            raise ValueError("another format")
        rounds = {}
        for key, (noise, rate, steps) in record["rounds"].items():
            if not (float(noise) >= 0 and 0 < float(rate) <= 1 and int(steps) >= 0):
                raise ValueError("an entry out of range")
            rounds[int(key)] = (float(noise), float(rate), int(steps))
        return rounds
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise UsageError(f"the privacy accountant {path} cannot be read ({error}); it is the holder's record of the "
                         "epsilon spent, so restore it or start a new --out folder") from None
