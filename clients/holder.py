"""A data holder: the only code that touches its raw images and its key.

What it hands to the training code is a frozen first layer (its AugConv, or for the baseline the plain layer)
and batches that are already morphed. Everything secret lives in the holder's own folder, owner-only: the key,
the AugConv built from it, and any holder-local backbone layers.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.augconv import AugConv
from clients.floor import SecurityFloor
from clients.keys import HolderKey
from clients.morphing import morph
from clients.privacy import DPPlan, PrivacyLedger, dp_plan
from clients.secrets import HolderSecrets, channel_order, draw_key
from simulation.data import ImageDataset, image_batches, load_dataset
from simulation.errors import UsageError
from simulation.files import atomic_torch_save, atomic_write_bytes, private_dir
from simulation.placement import placement_for
from simulation.protocol import HolderSettings
from simulation.run_folder import HOLDERS_FOLDER

KEY_FILE = "key.mple"
SPLITS = ("train", "test", "global")


def holder_folder_name(holder_id: int) -> str:
    return f"holder-{holder_id:04d}"


def holder_home(run_dir: str | Path, holder_id: int) -> Path:
    """A holder's folder inside a simulation's run folder (the launcher, on the holders' side, places it there)."""
    return Path(run_dir) / HOLDERS_FOLDER / holder_folder_name(holder_id)


def conv_fingerprint(conv: nn.Conv2d) -> str:
    digest = hashlib.sha256(conv.weight.detach().cpu().double().numpy().tobytes())
    if conv.bias is not None:
        digest.update(conv.bias.detach().cpu().double().numpy().tobytes())
    digest.update(repr((conv.kernel_size, conv.padding)).encode())
    return digest.hexdigest()[:16]


def key_padding(mode: str, conv: nn.Conv2d) -> int:
    """`conv` key padding morphs the zero-padded image, as the MoLe code does; `none` morphs the image as is."""
    if mode == "none":
        return 0
    if isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1]:
        raise UsageError("--key-padding conv needs a first convolution with equal padding on both axes")
    return int(conv.padding[0])


def holder_key(settings: HolderSettings, secrets: HolderSecrets, home: Path, image_shape, padding: int,
               floor: SecurityFloor) -> HolderKey:
    """Load the holder's key from its folder, or draw it from the holder's own secret and save it owner-only; either
    way refuse a key below the holder's own floor, whatever the server asked for."""
    floor.check_request(settings.key_family, settings.block_size, image_shape, padding)
    path = home / KEY_FILE
    if path.exists():
        key = HolderKey.load(path, image_shape=image_shape, auth_key=secrets.file_key)
        expected = (settings.key_family, settings.key_entries, padding)
        if (key.family, key.entries, key.padding) != expected or (
            settings.block_size is not None and key.block_size != settings.block_size
        ):
            raise UsageError(
                f"holder folder {home} holds a {key.family} key (q={key.block_size}, {key.entries}, padding "
                f"{key.padding}) that does not match this run's settings; use a new --out folder"
            )
        floor.check_key(key)
        return key
    key = draw_key(secrets, image_shape, family=settings.key_family, block_size=settings.block_size,
                   entries=settings.key_entries, padding=padding)
    floor.check_key(key)
    key.save(path, auth_key=secrets.file_key)
    return key


def load_own_data(spec: str, settings: HolderSettings, experiment: ImageDataset) -> ImageDataset:
    """A holder's own dataset (node config `dataset`, e.g. npz:/data/hospital-3.npz): its train split trains, its
    test split tests, in place of the holder's partition of the experiment dataset. It must match the experiment's
    image shape and classes, whose normalisation it uses."""
    own = load_dataset(spec, data_dir=settings.data_dir, image_size=settings.image_size, download=False)
    if own.image_shape != experiment.image_shape:
        raise UsageError(
            f"holder dataset {spec} has images of shape {own.image_shape}, the experiment's {experiment.name} has "
            f"{experiment.image_shape}; give images of that shape or set --image-size"
        )
    largest = max(int(split.labels.max()) for split in (own.train, own.test))
    if largest >= experiment.num_classes:
        raise UsageError(
            f"holder dataset {spec} has label {largest}; the experiment's {experiment.name} has "
            f"{experiment.num_classes} classes (labels 0..{experiment.num_classes - 1})"
        )
    return own


class Holder:
    """One holder's data, key and frozen first layer for one variant (`mple` morphs, `baseline` does not)."""

    def __init__(
        self,
        holder_id: int,
        settings: HolderSettings,
        home: str | Path,
        secrets: HolderSecrets,
        first_conv: nn.Conv2d,
        device: torch.device,
        *,
        own_data: str | None = None,
        floor: SecurityFloor = SecurityFloor(),
    ):
        self.settings = settings
        self.variant = settings.variant
        self.device = device
        self.home = private_dir(home)
        self.secrets = secrets
        placement = placement_for(settings)
        self._dataset = placement.dataset  # normalisation, image shape and the official test split
        self._sources = {"train": self._dataset.train, "test": self._dataset.train, "global": self._dataset.test}
        self._indices = {
            "train": placement.holder_train[holder_id],
            "test": placement.holder_test[holder_id],
            "global": placement.official_test(holder_id),
        }
        if own_data:
            own = load_own_data(own_data, settings, self._dataset)
            self._sources.update(train=own.train, test=own.test)
            self._indices.update(train=np.arange(len(own.train)), test=np.arange(len(own.test)))
        self.order = channel_order(secrets, settings.shuffle, first_conv.out_channels)
        self.first_layer_fingerprint = conv_fingerprint(first_conv)
        self.key: HolderKey | None = None
        self._test_evaluation: tuple[int, float, float] | None = None  # (round of the model, loss, accuracy)
        self._dp_plan: DPPlan | None = None
        if self.variant == "mple":
            padding = key_padding(settings.key_padding, first_conv)
            self.key = holder_key(settings, secrets, self.home, self._dataset.image_shape, padding, floor)
            self.first = self._augconv(first_conv)
        else:
            self.first = _permuted_frozen(first_conv, self.order).to(device)

    def _augconv(self, conv: nn.Conv2d) -> AugConv:
        """Build the AugConv once per first layer and keep it in the holder's folder."""
        path = self.home / f"augconv-{self.first_layer_fingerprint}-{self.key.fingerprint}.pt"
        if path.exists():
            module = AugConv.load(path, auth_key=self.secrets.file_key, device=self.device)
            if module is not None:
                return module
        module = AugConv.from_conv(conv.cpu(), self.key, self.order)
        module.save(path, auth_key=self.secrets.file_key)
        return module.to(self.device)

    @property
    def fingerprint(self) -> str | None:
        return None if self.key is None else self.key.fingerprint

    def num_examples(self, split: str) -> int:
        return len(self._indices[split])

    def local_seed(self, *labels) -> int:
        """A seed for the holder's own randomness (batch order, augmentation, dropout), from its secret: the same
        for both variants, unknown to the server."""
        return self.secrets.seed(*labels)

    def batches(self, split: str, *, shuffle_seed: int | None = None) -> Callable[[], Iterator]:
        """A re-iterable source of (first-layer input, label) batches. With `shuffle_seed`, the order (and
        augmentation, where on) is drawn from it, identically for both variants."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
        return self._image_batches(split, self._indices[split], self.settings.batch_size, generator)

    def _image_batches(self, split: str, indices: np.ndarray, batch_size: int, generator: torch.Generator | None):
        key = self.key
        return image_batches(
            self._sources[split], indices, batch_size=batch_size, mean=self._dataset.mean, std=self._dataset.std,
            generator=generator, augmentation=self.settings.augment, device=self.device,
            transform=None if key is None else (lambda images: morph(images, key)),
        )

    def poisson_batches(self, sample_rate: float, steps: int, *, seed: int) -> Callable[[], Iterator]:
        """DP-SGD's training batches (--dp holder): each pass is `steps` batches, each taking every training image
        independently with probability `sample_rate` (Poisson sampling, as the accountant assumes), so a batch may be
        empty; drawn, with augmentation where on, from `seed`."""
        generator = torch.Generator().manual_seed(seed)
        indices = self._indices["train"]
        empty = (torch.empty(0, device=self.device), torch.empty(0, dtype=torch.long, device=self.device))

        def iterate():
            for _ in range(steps):
                chosen = indices[(torch.rand(len(indices), generator=generator) < sample_rate).numpy()]
                yield next(iter(self._image_batches("train", chosen, max(1, len(chosen)), generator)()), empty)

        return iterate

    # ------------------------------------------------------------ differential privacy (--dp holder)
    @property
    def dp_plan(self) -> DPPlan:
        """Sample rate, steps and noise multiplier (calibrated once to a target epsilon, if the run sets one)."""
        if self._dp_plan is None:
            self._dp_plan = dp_plan(self.settings, self.num_examples("train"))
        return self._dp_plan

    @property
    def privacy(self) -> PrivacyLedger:
        """This variant's accountant history, read from the holder's own folder (other processes may train the same
        holder: each Ray worker keeps its own Holder objects)."""
        return PrivacyLedger(self.home / f"dp-{self.variant}.json")

    # ------------------------------------------------------------ the last evaluation on the test split
    def test_evaluation_of(self, model_round: int) -> tuple[float, float] | None:
        """(loss, accuracy) of the model after round `model_round` on the holder's test split, where this holder
        evaluated it already, in this process or another: Ray does not send a holder's messages to one worker, so
        the result is kept in the holder's folder too."""
        known = self._test_evaluation
        if known is None or known[0] != model_round:  # the folder is read only when this process's copy is stale
            known = self._read_test_evaluation()
        if known is None or known[0] != model_round:
            return None
        self._test_evaluation = known
        return known[1], known[2]

    def remember_test_evaluation(self, model_round: int, loss: float, accuracy: float) -> None:
        self._test_evaluation = (model_round, loss, accuracy)
        record = {"round": model_round, "loss": loss, "accuracy": accuracy}
        atomic_write_bytes(self._test_evaluation_path, json.dumps(record).encode(), private=True)

    @property
    def _test_evaluation_path(self) -> Path:
        return self.home / f"test-evaluation-{self.variant}.json"

    def _read_test_evaluation(self) -> tuple[int, float, float] | None:
        try:
            record = json.loads(self._test_evaluation_path.read_text())
            return int(record["round"]), float(record["loss"]), float(record["accuracy"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------ local state
    def local_state_path(self, server_round: int) -> Path:
        return self.home / f"local-{self.variant}-r{server_round:05d}.pt"

    def _saved_rounds(self) -> list[int]:
        return sorted(int(path.stem.rsplit("-r", 1)[1]) for path in self.home.glob(f"local-{self.variant}-r*.pt"))

    def load_local_state(self, before_round: int) -> dict[str, torch.Tensor] | None:
        """The holder-local backbone entries saved by the latest round before `before_round`."""
        rounds = [saved for saved in self._saved_rounds() if saved < before_round]
        if not rounds:
            return None
        return torch.load(self.local_state_path(rounds[-1]), map_location="cpu", weights_only=True)

    def save_local_state(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        atomic_torch_save({name: value.detach().cpu() for name, value in state.items()},
                          self.local_state_path(server_round), private=True)
        for saved in self._saved_rounds():
            if saved < server_round - 1:
                self.local_state_path(saved).unlink(missing_ok=True)


def _permuted_frozen(conv: nn.Conv2d, order: torch.Tensor) -> nn.Conv2d:
    plain = copy.deepcopy(conv)
    with torch.no_grad():
        plain.weight.copy_(conv.weight[order])
        if conv.bias is not None:
            plain.bias.copy_(conv.bias[order])
    plain.requires_grad_(False)
    return plain


class HolderCache:
    """Keeps the most recently used holders in memory; the rest live on their own disks until sampled again."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._holders: OrderedDict[tuple, Holder] = OrderedDict()

    def get(self, key: tuple, create: Callable[[], Holder]) -> Holder:
        if key in self._holders:
            self._holders.move_to_end(key)
            return self._holders[key]
        holder = create()
        self._holders[key] = holder
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)
        return holder

    def __len__(self) -> int:
        return len(self._holders)
