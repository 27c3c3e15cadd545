"""Who holds what: the public split the server may pretrain on, and each holder's train and test indices."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simulation.config import ExperimentConfig
from simulation.data import ImageDataset, load_dataset, partition, split_holder
from simulation.errors import UsageError


def derive_seed(seed: int, *labels) -> int:
    """A 63-bit seed for one purpose (e.g. ("key", 7)), independent of every other purpose's."""
    text = "/".join(str(part) for part in (seed, *labels)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


@dataclass(frozen=True, eq=False)
class Federation:
    dataset: ImageDataset
    public: np.ndarray  # indices into dataset.train that no holder owns
    holder_train: tuple[np.ndarray, ...]
    holder_test: tuple[np.ndarray, ...]

    @property
    def num_holders(self) -> int:
        return len(self.holder_train)


def federation_for(config: ExperimentConfig) -> Federation:
    return _federation(
        config.dataset,
        config.data_dir,
        config.image_size,
        config.holders,
        config.partition,
        config.test_fraction,
        config.public_fraction,
        config.seed,
    )


@lru_cache(maxsize=4)
def _federation(dataset_spec, data_dir, image_size, holders, scheme, test_fraction, public_fraction, seed) -> Federation:
    dataset = load_dataset(dataset_spec, data_dir=data_dir, image_size=image_size)
    order = np.random.default_rng(derive_seed(seed, "public")).permutation(len(dataset.train))
    num_public = int(round(public_fraction * len(order)))
    public, private = np.sort(order[:num_public]), np.sort(order[num_public:])
    if len(private) < 2 * holders:
        raise UsageError(
            f"{len(private)} private training images cannot be shared among {holders} holders; "
            "use fewer holders, a smaller --public-fraction or a larger dataset"
        )
    parts = partition(dataset.train.labels[private], holders, scheme, seed=derive_seed(seed, "partition"), min_size=2)
    train, test = [], []
    for holder, part in enumerate(parts):
        holder_train, holder_test = split_holder(private[part], test_fraction, seed=derive_seed(seed, "split", holder))
        train.append(holder_train)
        test.append(holder_test)
    return Federation(dataset, public, tuple(train), tuple(test))
