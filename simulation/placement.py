"""Who holds which images: the public split the server may pretrain on, and each holder's train and test indices.

A simulation's data placement is public plumbing (which hospital has which images), derived from the experiment
seed; the holders' secrets are not (see clients.secrets).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from simulation.data import ImageDataset, load_dataset, natural_sites, partition, partition_cache_dir, split_holder
from simulation.errors import UsageError
from simulation.seeds import derive_seed


class PlacementSettings(Protocol):
    """The settings a data placement depends on (an ExperimentConfig or a holder's HolderSettings)."""

    dataset: str
    data_dir: str | None
    image_size: int | None
    holders: int
    partition: str
    test_fraction: float
    public_fraction: float
    seed: int


@dataclass(frozen=True, eq=False)
class DataPlacement:
    dataset: ImageDataset
    public: np.ndarray  # indices into dataset.train that no holder owns
    holder_train: tuple[np.ndarray, ...]
    holder_test: tuple[np.ndarray, ...]
    by_site: bool = False  # --partition natural on data whose test images name their sites too

    @property
    def num_holders(self) -> int:
        return len(self.holder_train)

    def official_test(self, holder: int) -> np.ndarray:
        """Indices into dataset.test that `holder` scores the final model on: its own site's test images where the
        split is by site and the test images name theirs (a hospital's test patients are its own, morphed with its
        key), else the whole official test split."""
        if self.by_site:
            return np.flatnonzero(self.dataset.test.sites == holder)
        return np.arange(len(self.dataset.test))


def placement_for(settings: PlacementSettings) -> DataPlacement:
    return _placement(
        settings.dataset,
        settings.data_dir,
        settings.image_size,
        settings.holders,
        settings.partition,
        settings.test_fraction,
        settings.public_fraction,
        settings.seed,
    )


@lru_cache(maxsize=4)
def _placement(dataset_spec, data_dir, image_size, holders, scheme, test_fraction, public_fraction, seed) -> DataPlacement:
    dataset = load_dataset(dataset_spec, data_dir=data_dir, image_size=image_size)
    order = np.random.default_rng(derive_seed(seed, "public")).permutation(len(dataset.train))
    num_public = int(round(public_fraction * len(order)))
    public, private = np.sort(order[:num_public]), np.sort(order[num_public:])
    if len(private) < 2 * holders:
        raise UsageError(
            f"{len(private)} private training images cannot be shared among {holders} holders: each holder needs "
            f"at least 2, so at most {len(private) // 2} holders; use fewer holders, a smaller --public-fraction or "
            "a larger dataset"
        )
    sites = natural_sites(dataset, holders, scheme)
    parts = partition(dataset.train.labels[private], holders, scheme, seed=derive_seed(seed, "partition"), min_size=2,
                      sites=None if sites is None else sites[private], cache_dir=partition_cache_dir(data_dir))
    train, test = [], []
    for holder, part in enumerate(parts):
        holder_train, holder_test = split_holder(private[part], test_fraction, seed=derive_seed(seed, "split", holder))
        train.append(holder_train)
        test.append(holder_test)
    return DataPlacement(dataset, public, tuple(train), tuple(test),
                         by_site=sites is not None and dataset.test.sites is not None)
