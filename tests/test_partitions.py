"""Flower Datasets partitioners and natural (per-site) splits, through simulation.run's planning step: every
`--partition` scheme, data that names its sites (an npz with train_sites, a folder per site, and PneumoniaMNIST
split into sites by a documented rule), and the errors a user meets."""

import re
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clients.holder import Holder
from clients.secrets import HolderSecrets
from server.first_layer import initial_model
from server.plan import plan_run
from simulation.cli import config_from_args, parse_args
from simulation.config import build_config
from simulation.data import PARTITION_SCHEMES, load_dataset, partition
from simulation.errors import UsageError
from simulation.protocol import HolderSettings
from simulation.report import write_setup
from simulation.run import main

# One planning-step run per scheme on the digits (1,437 training images, 1,293 private): holders, scheme.
SCHEME_RUNS = {
    "iid": (10, "iid"),
    "dirichlet": (10, "dirichlet:0.3,true"),
    "inner-dirichlet": (10, "inner-dirichlet:0.5"),
    "pathological": (10, "pathological:3,deterministic"),
    "shard": (10, "shard:3"),
    "linear": (10, "linear"),
    "square": (8, "square"),
    "exponential": (5, "exponential"),
}


def plan(*argv: str):
    """The plan simulation.run makes from these flags before anything starts."""
    return plan_run(config_from_args(parse_args(list(argv))))


def holder_images(placement, holder: int) -> np.ndarray:
    return np.concatenate([placement.holder_train[holder], placement.holder_test[holder]])


def test_every_scheme_has_a_planning_run_here_and_is_documented_with_its_arguments(capsys):
    assert set(SCHEME_RUNS) | {"natural"} == set(PARTITION_SCHEMES)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    usage = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # argparse wraps after hyphens
    for scheme in PARTITION_SCHEMES.values():
        assert f"`{scheme.usage}`" in readme and f"`{scheme.flower}`" in readme, scheme.usage
        assert f"{scheme.usage}: {scheme.meaning}" in usage, scheme.usage


@pytest.mark.parametrize("name", sorted(SCHEME_RUNS))
def test_every_partitioner_plans_through_simulation_run(name):
    holders, scheme = SCHEME_RUNS[name]
    placement = plan("--holders", str(holders), "--partition", scheme).placement

    assert placement.num_holders == holders
    owned = [holder_images(placement, holder) for holder in range(holders)]
    assert min(len(images) for images in owned) >= 2 and min(len(train) for train in placement.holder_train) >= 1
    together = np.concatenate([placement.public, *owned])
    assert len(np.unique(together)) == len(together)  # no image with two owners, none both public and private
    sizes = np.array([len(images) for images in owned])
    labels = placement.dataset.train.labels
    if name in ("linear", "square", "exponential"):
        assert (np.diff(sizes) > 0).all()
    if name == "pathological":
        assert all(len(np.unique(labels[images])) == 3 for images in owned)
    if name == "shard":  # 3 shards of one class each, or two where a shard straddles a class boundary
        classes = [len(np.unique(labels[images])) for images in owned]
        assert max(classes) <= 6 and np.mean(classes) < 5


def test_partitions_are_deterministic_from_the_seed():
    def parts(seed):
        placement = plan("--partition", "inner-dirichlet:0.5", "--seed", str(seed)).placement
        return [holder_images(placement, holder) for holder in range(placement.num_holders)]

    first, again, other = parts(3), parts(3), parts(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_a_bad_or_impossible_partition_is_one_line_before_anything_starts(tmp_path, capsys):
    for argv, fragments in (
        (["--partition", "dirichlet:zero"], ("ALPHA", "a number > 0")),
        (["--partition", "sharding"], ("did you mean 'shard'?",)),
        (["--holders", "10", "--partition", "exponential"], ("ExponentialPartitioner", "fewer holders")),
        (["--partition", "natural"], ("names each image's site", "digits names none")),
    ):
        assert main([*argv, "--out", str(tmp_path / "run")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and all(fragment in error for fragment in fragments), error
    assert not (tmp_path / "run").exists()


def test_partitioning_needs_no_network_and_warns_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("partitioning tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    labels = np.repeat(np.arange(4), 25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scheme in ("iid", "dirichlet:0.5", "shard", "pathological:2"):
            partition(labels, 4, scheme, seed=0)
        partition(labels, 4, "natural", seed=0, sites=np.arange(100) % 4)


# ------------------------------------------------------------------------------------------ natural splits
def site_npz(path: Path, site_sizes: dict[str, int], *, test_sites: bool = True) -> Path:
    """A small npz whose images name their site; each site's images have the site's own brightness."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, share in (("train", 1.0), ("test", 0.25)):
        names = [name for name, size in site_sizes.items() for _ in range(max(1, int(size * share)))]
        brightness = {name: 40 * (index + 1) for index, name in enumerate(sorted(site_sizes))}
        arrays[f"{split}_images"] = np.stack([np.full((8, 8), brightness[name], np.uint8) for name in names])
        arrays[f"{split}_labels"] = rng.integers(0, 2, (len(names), 1))
        if split == "train" or test_sites:
            arrays[f"{split}_sites"] = np.array(names)
    np.savez(path, **arrays)
    return path


def test_natural_split_from_an_npz_with_sites(tmp_path):
    path = site_npz(tmp_path / "clinics.npz", {"clinic-b": 40, "clinic-a": 30, "clinic-c": 60})
    dataset = load_dataset(f"npz:{path}")
    assert dataset.site_names == ("clinic-a", "clinic-b", "clinic-c")
    assert np.bincount(dataset.train.sites).tolist() == [30, 40, 60] and dataset.test.sites.max() == 2

    config = config_from_args(parse_args(["--dataset", f"npz:{path}", "--partition", "natural"]))
    assert config.holders == 3  # the holders follow the sites
    placement = plan_run(config).placement
    for holder in range(3):
        images = holder_images(placement, holder)
        assert (dataset.train.sites[images] == holder).all()
        assert (dataset.train.images[images] == 40 * (holder + 1)).all()  # holder i is site i
    owned = sum(len(holder_images(placement, holder)) for holder in range(3))
    assert owned + len(placement.public) == len(dataset.train)

    write_setup(config, tmp_path)  # the class-count table and chart of a run
    assert (tmp_path / "class_counts.png").stat().st_size > 0
    assert '"2": [' in (tmp_path / "class_counts.json").read_text()


def test_each_site_scores_the_final_model_on_its_own_test_images(tmp_path):
    path = site_npz(tmp_path / "clinics.npz", {"clinic-a": 40, "clinic-b": 60})
    dataset = load_dataset(f"npz:{path}")
    config = config_from_args(parse_args(["--dataset", f"npz:{path}", "--partition", "natural"]))
    plan = plan_run(config)
    settings = HolderSettings.from_config(config, "mple")
    first = initial_model(config, plan.placement).first
    scored = []
    for site in range(2):
        holder = Holder(site, settings, tmp_path / f"holder-{site}", HolderSecrets.from_holder_seed(0, site), first,
                        torch.device("cpu"))
        indices = holder._indices["global"]
        assert len(indices) == holder.num_examples("global") == int((dataset.test.sites == site).sum()) > 0
        assert (dataset.test.images[indices] == 40 * (site + 1)).all()  # that clinic's own images only
        scored += indices.tolist()
    assert sorted(scored) == list(range(len(dataset.test)))  # together, the whole official test split, once
    no_test_sites = load_dataset(f"npz:{site_npz(tmp_path / 'train-only.npz', {'a': 40, 'b': 60}, test_sites=False)}")
    assert no_test_sites.test.sites is None
    unsited = plan_run(config_from_args(parse_args(["--dataset", f"npz:{tmp_path / 'train-only.npz'}",
                                                    "--partition", "natural"]))).placement
    assert unsited.official_test(1).tolist() == list(range(len(no_test_sites.test)))  # every holder: all of it


def test_holders_that_disagree_with_the_sites_are_one_clear_line(tmp_path, capsys):
    path = site_npz(tmp_path / "clinics.npz", {"a": 20, "b": 20, "c": 20})
    assert build_config({"dataset": f"npz:{path}", "partition": "natural", "holders": 4}).holders == 4
    assert main(["--dataset", f"npz:{path}", "--partition", "natural", "--holders", "4",
                 "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "3 sites (a, b, c)" in error and "--holders 4 disagrees" in error
    assert not (tmp_path / "run").exists()


def test_a_site_too_small_for_its_holder_is_named(tmp_path):
    path = site_npz(tmp_path / "clinics.npz", {"big": 60, "tiny": 1}, test_sites=False)
    with pytest.raises(UsageError, match="gives holder 1 [01] of .*merge that site with another"):
        plan("--dataset", f"npz:{path}", "--partition", "natural")


def test_malformed_sites_are_refused(tmp_path):
    path = site_npz(tmp_path / "clinics.npz", {"a": 10, "b": 10})
    arrays = dict(np.load(path))
    for name, change, fragment in (
        ("short", {"train_sites": arrays["train_sites"][:-1]}, "one site per image"),
        ("float", {"train_sites": np.zeros(len(arrays["train_sites"]))}, "integers or strings"),
        ("unknown", {"test_sites": np.full(len(arrays["test_sites"]), "z")}, "['z'] that train_sites lacks"),
        ("mixed", {"test_sites": np.zeros(len(arrays["test_sites"]), int)}, "same kind of site names"),
        ("test only", {"train_sites": None}, "test_sites but no train_sites"),
    ):
        changed = tmp_path / f"{name}.npz"
        np.savez(changed, **{key: value for key, value in {**arrays, **change}.items() if value is not None})
        with pytest.raises(UsageError, match=re.escape(fragment)) as info:
            load_dataset(f"npz:{changed}")
        assert str(changed) in str(info.value)


def test_natural_split_from_one_folder_per_site(tmp_path):
    root = tmp_path / "hospitals"
    layout = {"north/normal": 6, "north/pneumonia": 4, "south/train/normal": 3, "south/train/pneumonia": 5,
              "south/test/pneumonia": 2, "west/normal": 5, "west/effusion": 5}
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        for index in range(count):
            Image.new("L", (12, 10), 30 + 10 * index).save(root / folder / f"{index}.png")
    dataset = load_dataset(f"sites:{root}", image_size=8)

    assert dataset.name == "hospitals" and dataset.site_names == ("north", "south", "west")
    assert dataset.class_names == ("effusion", "normal", "pneumonia") and dataset.image_shape == (1, 8, 8)
    assert np.bincount(dataset.test.sites).tolist() == [2, 2, 2]  # north and west: stratified 20%; south: test/
    assert np.bincount(dataset.train.sites).tolist() == [8, 8, 8]
    assert dataset.test.labels[dataset.test.sites == 1].tolist() == [2, 2]

    placement = plan("--dataset", f"sites:{root}", "--image-size", "8", "--partition", "natural",
                     "--public-fraction", "0", "--first-layer", "random").placement
    assert placement.num_holders == 3
    assert [np.unique(dataset.train.sites[holder_images(placement, holder)]).tolist() for holder in range(3)] == [
        [0], [1], [2]]


def test_site_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UsageError, match="site folder not found") as info:
        load_dataset(f"sites:{missing}")
    assert str(missing) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no site folders"):
        load_dataset(f"sites:{tmp_path / 'empty'}")


def brightness_sites(images: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The documented rule (README, "Natural splits"): an image's site is the quartile of its mean pixel value, a
    stand-in for four hospitals whose scanners expose differently; quartile edges from the training images."""
    return np.searchsorted(edges, images.reshape(len(images), -1).mean(axis=1), side="right")


def test_pneumoniamnist_split_into_sites_by_brightness(shared_data, tmp_path):
    source = shared_data / "pneumoniamnist.npz"
    if not source.is_file():
        pytest.skip(f"{source} is absent from the shared data folder")
    arrays = dict(np.load(source))
    means = arrays["train_images"].reshape(len(arrays["train_images"]), -1).mean(axis=1)
    edges = np.quantile(means, [0.25, 0.5, 0.75])
    for split in ("train", "test"):
        arrays[f"{split}_sites"] = brightness_sites(arrays[f"{split}_images"], edges)
    path = tmp_path / "pneumonia-sites.npz"  # a temporary copy with sites: nothing lands in the repository
    np.savez(path, **arrays)

    placement = plan("--dataset", f"npz:{path}", "--partition", "natural").placement
    dataset = placement.dataset
    assert placement.num_holders == 4 and dataset.site_names == ("0", "1", "2", "3")
    brightness = [dataset.train.images[holder_images(placement, holder)].mean() for holder in range(4)]
    assert brightness == sorted(brightness) and brightness[3] - brightness[0] > 20
    sizes = [len(holder_images(placement, holder)) for holder in range(4)]
    assert min(sizes) > 0.2 * len(dataset.train) * 0.9  # quartiles: about a quarter each, less the public share
    pneumonia_share = [dataset.train.labels[holder_images(placement, holder)].mean() for holder in range(4)]
    assert max(pneumonia_share) - min(pneumonia_share) > 0.05  # sites differ in their class mix too


def test_a_kept_partition_is_read_back_instead_of_drawn_again(tmp_path, monkeypatch):
    """The other processes of a run (Ray workers, ClientApp processes) read the launcher's split from the data
    directory rather than import Flower Datasets again; a damaged file is drawn anew."""
    from simulation import data

    labels = np.repeat(np.arange(5), 40)
    first = partition(labels, 6, "dirichlet:0.5", seed=3, cache_dir=tmp_path)
    (kept,) = tmp_path.iterdir()

    def no_flower(*args):
        raise AssertionError("drew the partition again")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_flower_parts", no_flower)
        again = partition(labels, 6, "dirichlet:0.5", seed=3, cache_dir=tmp_path)
        with pytest.raises(AssertionError, match="drew"):  # another seed is another split
            partition(labels, 6, "dirichlet:0.5", seed=4, cache_dir=tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    kept.write_bytes(b"damaged")
    assert all(np.array_equal(a, b) for a, b in zip(first, partition(labels, 6, "dirichlet:0.5", seed=3, cache_dir=tmp_path)))

    plan("--data-dir", str(tmp_path / "data"), "--holders", "4")
    assert len(list((tmp_path / "data" / "partitions").iterdir())) == 1
