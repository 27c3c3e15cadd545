"""Tests for the data layer: loaders on real files, statistics, partitions, augmentation, errors."""

import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simulation import data
from simulation.data import (
    DataError,
    _medmnist_info,
    augment,
    class_counts,
    load_dataset,
    normalize,
    partition,
    plot_class_counts,
    split_holder,
)
from simulation.errors import UsageError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def shared_file(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{path} is absent from the shared data folder")
    return path


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return dict(archive)


def assert_data_error(call, *fragments) -> str:
    """`call` raises DataError with a one-line message naming every fragment (paths, keys)."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} missing from: {message}"
    return message


def entropy_per_holder(counts: np.ndarray) -> float:
    shares = counts / counts.sum(axis=1, keepdims=True)
    logs = np.log(np.where(shares > 0, shares, 1))
    return float(-(shares * logs).sum(axis=1).mean())


# --- loaders ---------------------------------------------------------------------------------


def test_digits_loads_stratified_and_deterministic():
    from sklearn.datasets import load_digits

    dataset = load_dataset("digits")
    again = load_dataset("digits")
    raw = load_digits()

    assert dataset.image_shape == (1, 8, 8) and dataset.channels == 1
    assert dataset.train.images.dtype == np.uint8 and dataset.train.labels.dtype == np.int64
    assert len(dataset.train) + len(dataset.test) == len(raw.target) and dataset.val is None
    assert dataset.num_classes == 10 and dataset.class_names == tuple("0123456789")
    assert dataset.train.images.max() == 255 and dataset.train.images.min() == 0
    test_share = np.bincount(dataset.test.labels, minlength=10) / np.bincount(raw.target, minlength=10)
    np.testing.assert_allclose(test_share, 0.2, atol=0.01)
    np.testing.assert_array_equal(dataset.train.images, again.train.images)
    np.testing.assert_array_equal(dataset.test.labels, again.test.labels)
    # Every loaded image is one of the originals, scaled 0..16 -> 0..255, with its own label.
    scaled = np.round(raw.images * 255 / 16).astype(np.uint8)
    index = {image.tobytes(): label for image, label in zip(scaled, raw.target)}
    assert all(index[image[0].tobytes()] == label for image, label in zip(dataset.test.images, dataset.test.labels))


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("pneumoniamnist.npz", (4708, 524, 624)), ("breastmnist.npz", (546, 78, 156))],
)
def test_npz_loads_medmnist_files(shared_data, name, sizes):
    path = shared_file(shared_data, name)
    dataset = load_dataset(f"npz:{path}")
    raw = read_npz(path)

    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == sizes
    assert dataset.image_shape == (1, 28, 28) and dataset.num_classes == 2
    np.testing.assert_array_equal(dataset.train.images[:, 0], raw["train_images"])
    np.testing.assert_array_equal(dataset.val.labels, raw["val_labels"][:, 0])
    np.testing.assert_array_equal(dataset.test.labels, raw["test_labels"][:, 0])


def test_npz_loads_colour_cifar_subset(shared_data):
    path = shared_file(shared_data, "cifar10-subset.npz")
    dataset = load_dataset(f"npz:{path}")
    raw = read_npz(path)

    assert dataset.image_shape == (3, 32, 32) and dataset.val is None
    assert (len(dataset.train), len(dataset.test), dataset.num_classes) == (12000, 2000, 10)
    np.testing.assert_array_equal(dataset.test.images, raw["test_images"].transpose(0, 3, 1, 2))
    assert np.bincount(dataset.train.labels).tolist() == [1200] * 10


def test_medmnist_reads_local_file_with_class_names(shared_data):
    shared_file(shared_data, "pneumoniamnist.npz")
    dataset = load_dataset("medmnist:PneumoniaMNIST", data_dir=shared_data, download=False)
    plain = load_dataset(f"npz:{shared_data / 'pneumoniamnist.npz'}")

    assert dataset.name == "pneumoniamnist" and dataset.class_names == ("normal", "pneumonia")
    np.testing.assert_array_equal(dataset.train.images, plain.train.images)
    assert dataset.mean == plain.mean


@pytest.fixture
def medmnist_info(monkeypatch):
    """The medmnist package's metadata as the loader reads it, any change to it undone after the test."""
    info = _medmnist_info()

    def entry(name: str) -> dict:
        monkeypatch.setitem(info, name, dict(info[name]))
        return info[name]

    return entry


def test_medmnist_download_writes_checked_file_atomically(shared_data, tmp_path, medmnist_info):
    # A file:// URL exercises the real download path without any network.
    source = shared_file(shared_data, "breastmnist.npz")
    medmnist_info("breastmnist")["url"] = source.as_uri()
    dataset = load_dataset("medmnist:breastmnist", data_dir=tmp_path / "cache", download=True)

    assert (tmp_path / "cache" / "breastmnist.npz").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["breastmnist.npz"]
    assert len(dataset.train) == 546


def test_a_run_downloads_only_when_told_to(shared_data, tmp_path, medmnist_info, capsys):
    from simulation.run import main

    medmnist_info("breastmnist")["url"] = shared_file(shared_data, "breastmnist.npz").as_uri()
    argv = ["--dataset", "medmnist:breastmnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "download is off; pass --download" in error
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    # Told to, the launcher fetches it before planning; 1000 holders then stop the run before it starts.
    assert main([*argv, "--download", "--holders", "1000"]) == 2
    assert "each holder needs at least 2" in capsys.readouterr().err
    assert (tmp_path / "data" / "breastmnist.npz").is_file() and not (tmp_path / "run").exists()


def test_medmnist_download_rejects_wrong_checksum_and_leaves_nothing(shared_data, tmp_path, medmnist_info):
    medmnist_info("breastmnist")["url"] = shared_file(shared_data, "pneumoniamnist.npz").as_uri()
    assert_data_error(
        lambda: load_dataset("medmnist:breastmnist", data_dir=tmp_path, download=True), "MD5", tmp_path / "breastmnist.npz"
    )
    assert list(tmp_path.iterdir()) == []


def test_medmnist_failed_download_names_url_and_target(tmp_path, medmnist_info):
    medmnist_info("octmnist")["url"] = (tmp_path / "nowhere" / "octmnist.npz").as_uri()
    assert_data_error(
        lambda: load_dataset("medmnist:octmnist", data_dir=tmp_path, download=True), tmp_path / "octmnist.npz", "nowhere"
    )
    assert list(tmp_path.iterdir()) == []


def test_medmnist_metadata_is_the_packages_read_without_importing_the_package(monkeypatch):
    import medmnist

    assert _medmnist_info() == medmnist.INFO
    # `import medmnist` also imports scikit-learn (2 s of each holder process's first message): the loader does not.
    for name in [name for name in sys.modules if name == "medmnist" or name.startswith("medmnist.")]:
        monkeypatch.delitem(sys.modules, name)
    _medmnist_info.cache_clear()
    try:
        assert _medmnist_info()["pneumoniamnist"]["label"] == {"0": "normal", "1": "pneumonia"}
        assert not [name for name in sys.modules if name.startswith("medmnist")]
    finally:
        _medmnist_info.cache_clear()


def test_every_single_label_2d_medmnist_set_and_size_is_known_from_the_package():
    import medmnist

    two_d = [name for name, info in medmnist.INFO.items() if not info["python_class"].endswith("3D")]
    assert len(two_d) == 12
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in two_d)
    for name in two_d:
        info = medmnist.INFO[name]
        if "multi-label" in info["task"]:
            continue
        message = assert_data_error(lambda: load_dataset(f"medmnist:{name}@64", data_dir="/nonexistent", download=False),
                                    f"{name}_64.npz", info["url_64"])
        assert "download is off" in message


@pytest.fixture
def breastmnist_128(shared_data, tmp_path) -> Path:
    """A data folder with breastmnist_128.npz: the real BreastMNIST, each pixel repeated to 128x128."""
    raw = read_npz(shared_file(shared_data, "breastmnist.npz"))
    large = {key: np.repeat(np.repeat(value, 128 // 28 + 1, axis=1), 128 // 28 + 1, axis=2)[:, :128, :128]
             if key.endswith("images") else value for key, value in raw.items()}  # fmt: skip
    np.savez(tmp_path / "breastmnist_128.npz", **large)
    return tmp_path


def test_medmnist_sizes_read_their_own_local_files(shared_data, breastmnist_128):
    tmp_path = breastmnist_128
    raw = read_npz(shared_file(shared_data, "breastmnist.npz"))
    dataset = load_dataset("medmnist:BreastMNIST@128", data_dir=tmp_path, download=False)
    assert dataset.name == "breastmnist_128" and dataset.image_shape == (1, 128, 128)
    assert dataset.class_names == ("malignant", "normal, benign") and len(dataset.val) == 78
    np.testing.assert_array_equal(dataset.train.labels, raw["train_labels"][:, 0])
    assert_data_error(lambda: load_dataset("medmnist:breastmnist@64", data_dir=tmp_path, download=False),
                      tmp_path / "breastmnist_64.npz", "breastmnist_64.npz?download=1")
    assert_data_error(lambda: load_dataset("medmnist:breastmnist@100", data_dir=tmp_path, download=False),
                      "size '100'", "28, 64, 128, 224")
    # A file of another size under the name is not taken for the official one.
    (tmp_path / "breastmnist_224.npz").write_bytes((tmp_path / "breastmnist_128.npz").read_bytes())
    assert_data_error(lambda: load_dataset("medmnist:breastmnist@224", data_dir=tmp_path, download=False),
                      "(1, 128, 128)", "(1, 224, 224)", "not the official file")
    np.savez(tmp_path / "breastmnist.npz", **{**raw, "test_images": raw["test_images"][:100],
                                              "test_labels": raw["test_labels"][:100]})
    assert_data_error(lambda: load_dataset("medmnist:breastmnist", data_dir=tmp_path, download=False),
                      "'test': 100", "'test': 156", "npz:")


def test_keys_too_large_for_memory_at_medmnist_plus_sizes_are_refused_before_anything_starts(breastmnist_128, capsys):
    from server.first_layer import initial_model
    from server.plan import check_memory
    from simulation.config import build_config
    from simulation.placement import placement_for
    from simulation.run import main

    out = breastmnist_128 / "run"
    spec = ["--dataset", "medmnist:breastmnist@128", "--data-dir", str(breastmnist_128)]
    assert main([*spec, "--key-family", "dense", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dense key with q = 16384 on 1x128x128 images needs 36.00 GiB per holder" in error
    assert not out.exists()
    # A blocks key (0.78 GiB per holder) fits a large machine, not a small one, nor ten holders kept on a medium one.
    config = build_config({"dataset": "medmnist:breastmnist@128", "data_dir": str(breastmnist_128), "key_family": "blocks"})
    model = initial_model(config, placement_for(config))
    assert check_memory(config, (1, 128, 128), model, 0, memory_bytes=64 * 2**30) == 2 * 8 * 16384 * 128 + 768 * 2**20
    with pytest.raises(UsageError, match=r"0\.78 GiB per holder .*0\.75 GiB more while its AugConv is built.* 2\.0 GiB"):
        check_memory(config, (1, 128, 128), model, 0, memory_bytes=2 * 2**30)
    with pytest.raises(UsageError, match="lower --holder-cache to"):
        check_memory(config, (1, 128, 128), model, 0, memory_bytes=8 * 2**30)


def test_multi_label_chestmnist_is_refused_with_the_reason(shared_data, tmp_path):
    raw = read_npz(shared_file(shared_data, "breastmnist.npz"))
    findings = (np.random.default_rng(3).random((len(raw["train_labels"]), 14)) < 0.05).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **{**raw, "train_labels": findings})

    for spec in ("medmnist:chestmnist", "medmnist:chestmnist@224"):
        assert_data_error(lambda: load_dataset(spec, data_dir=tmp_path, download=False),
                          "multi-label", "14 findings", "single-label", "npz:PATH")
    assert_data_error(lambda: load_dataset(f"npz:{tmp_path / 'chestmnist.npz'}"), tmp_path / "chestmnist.npz",
                      "multi-label", "single-label")


def write_cifar10_copy(root: Path, train_images, train_labels, test_images, test_labels) -> None:
    """The `cifar-10-batches-py` folder exactly as torchvision reads it (latin-1 pickles, str keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, entry):
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file, protocol=2)

    def batch(label, images, labels):
        flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        return {"batch_label": label, "labels": [int(y) for y in labels], "data": flat,
                "filenames": [f"image_{i}.png" for i in range(len(images))]}  # fmt: skip

    for number, (images, labels) in enumerate(zip(np.array_split(train_images, 5), np.array_split(train_labels, 5)), 1):
        dump(f"data_batch_{number}", batch(f"training batch {number} of 5", images, labels))
    dump("test_batch", batch("testing batch 1 of 1", test_images, test_labels))
    dump("batches.meta", {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": 60, "num_vis": 3072})


def test_cifar10_reads_local_torchvision_copy(shared_data, tmp_path, monkeypatch):
    raw = read_npz(shared_file(shared_data, "cifar10-subset.npz"))
    train_images, train_labels = raw["train_images"][::40], raw["train_labels"][::40, 0]
    test_images, test_labels = raw["test_images"][::20], raw["test_labels"][::20, 0]
    write_cifar10_copy(tmp_path, train_images, train_labels, test_images, test_labels)

    dataset = load_dataset("cifar10", data_dir=tmp_path, download=False)

    assert dataset.class_names == CIFAR10_CLASSES and dataset.image_shape == (3, 32, 32)
    np.testing.assert_array_equal(dataset.train.images, train_images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(dataset.train.labels, train_labels)
    np.testing.assert_array_equal(dataset.test.images, test_images.transpose(0, 3, 1, 2))
    # torchvision's own reader agrees once its checks of the official MD5 sums are lifted.
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = torchvision.datasets.CIFAR10(tmp_path, train=True)
    np.testing.assert_array_equal(dataset.train.images, reference.data.transpose(0, 3, 1, 2))
    assert dataset.train.labels.tolist() == reference.targets and list(dataset.class_names) == reference.classes


def test_cifar100_reads_local_copy(shared_data, tmp_path):
    raw = read_npz(shared_file(shared_data, "cifar10-subset.npz"))
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{k}" for k in range(100)]
    for split, images in (("train", raw["train_images"][:300]), ("test", raw["test_images"][:100])):
        labels = [i % 100 for i in range(len(images))]
        entry = {
            "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
            "fine_labels": labels,
            "coarse_labels": [y // 5 for y in labels],
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "meta").write_bytes(
        pickle.dumps({"fine_label_names": names, "coarse_label_names": names[:20]}, protocol=2)
    )

    dataset = load_dataset("cifar100", data_dir=tmp_path, download=False)

    assert dataset.num_classes == 100 and dataset.class_names[7] == "class_7"
    assert (len(dataset.train), len(dataset.test)) == (300, 100)
    assert np.bincount(dataset.train.labels).tolist() == [3] * 100


def test_cifar_missing_copy_without_download_names_folder(tmp_path):
    assert_data_error(
        lambda: load_dataset("cifar10", data_dir=tmp_path, download=False), tmp_path / "cifar-10-batches-py"
    )
    (tmp_path / "cifar-100-python").mkdir()
    assert_data_error(
        lambda: load_dataset("cifar100", data_dir=tmp_path, download=False), tmp_path / "cifar-100-python" / "meta"
    )


def solid(mode: str, size: tuple[int, int], value) -> Image.Image:
    return Image.new(mode, size, value)


def build_mixed_tree(root: Path) -> list[tuple[int, ...]]:
    """Class folders with mixed formats, modes and sizes; returns each image's expected RGB colour."""
    palette_image = Image.new("P", (20, 25), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    see_through = Image.new("P", (14, 14), 2)
    see_through.putpalette([0, 0, 0, 9, 9, 9, 240, 120, 0] + [0] * 759)
    see_through.info["transparency"] = bytes([0, 128, 255])
    sixteen_bit = Image.fromarray(np.full((12, 30), 257 * 100, dtype=np.uint16))
    files = {
        "apple/a.PNG": (solid("RGB", (40, 30), (200, 30, 40)), (200, 30, 40)),
        "apple/b.JPG": (solid("RGB", (33, 33), (20, 120, 220)), (20, 120, 220)),
        "apple/c.png": (palette_image, (10, 200, 30)),
        "apple/d.png": (solid("RGBA", (16, 64), (250, 250, 0, 128)), (250, 250, 0)),
        "apple/e.Png": (see_through, (240, 120, 0)),
        "bean/k.BMP": (solid("L", (64, 48), 77), (77,) * 3),
        "bean/f.TIFF": (sixteen_bit, (100,) * 3),
        "bean/nested/g.png": (solid("LA", (9, 9), (50, 200)), (50,) * 3),
        "corn/h.jpeg": (solid("L", (31, 17), 90), (90,) * 3),
        "corn/i.tif": (solid("RGB", (8, 8), (60, 60, 60)), (60,) * 3),
    }
    for name, (image, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    (root / "corn" / "notes.txt").write_text("not an image")
    (root / "corn" / ".hidden.png").write_bytes(b"ignored, hidden")
    assert sixteen_bit.mode == "I;16" and palette_image.mode == "P"
    return [colour for _, colour in files.values()]


def test_folder_loads_mixed_formats_as_rgb(tmp_path):
    expected = build_mixed_tree(tmp_path / "fruit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's warning on palette transparency converted straight to RGB
        dataset = load_dataset(f"folder:{tmp_path / 'fruit'}")

    assert dataset.name == "fruit" and dataset.class_names == ("apple", "bean", "corn")
    assert dataset.image_shape == (3, 32, 32) and dataset.train.images.dtype == np.uint8
    assert (len(dataset.train), len(dataset.test)) == (8, 2)
    assert sorted(np.bincount(np.concatenate([dataset.train.labels, dataset.test.labels]))) == [2, 3, 5]
    images = np.concatenate([dataset.train.images, dataset.test.images])
    assert all((image == image[:, :1, :1]).all() for image in images)  # solid colours stay solid
    colours = sorted(tuple(int(v) for v in image[:, 0, 0]) for image in images)
    np.testing.assert_allclose(colours, sorted(expected), atol=3)  # JPEG is not exact


def test_folder_of_grey_images_is_grey_and_resizable(tmp_path):
    for index, size in enumerate([(10, 20), (64, 64), (7, 5), (30, 12), (50, 50)]):
        for label in ("normal", "pneumonia"):
            (tmp_path / "xray" / label).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(index).integers(0, 256, size[::-1], dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "xray" / label / f"{index}.png")
    dataset = load_dataset(f"folder:{tmp_path / 'xray'}", image_size=20)

    assert dataset.image_shape == (1, 20, 20)
    assert (len(dataset.train), len(dataset.test)) == (8, 2)
    assert np.bincount(dataset.test.labels).tolist() == [1, 1]


def test_folder_takes_train_and_test_trees(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for label, value in (("a", 20), ("b", 220)):
            folder = tmp_path / "tree" / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                solid("L", (12, 12), value + index).save(folder / f"{index}.png")
    dataset = load_dataset(f"folder:{tmp_path / 'tree'}", image_size=8)

    assert dataset.class_names == ("a", "b") and dataset.image_shape == (1, 8, 8)
    assert sorted(dataset.test.images[:, 0, 0, 0].tolist()) == [20, 21, 220, 221]
    assert sorted(dataset.train.images[:, 0, 0, 0].tolist()) == [20, 21, 22, 220, 221, 222]
    assert dataset.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_size_resizes_like_pil(shared_data):
    path = shared_file(shared_data, "breastmnist.npz")
    raw = read_npz(path)["train_images"]
    for size in (16, 40):
        dataset = load_dataset(f"npz:{path}", image_size=size)
        assert dataset.image_shape == (1, size, size) and dataset.val.images.shape[2:] == (size, size)
        for index in (0, 100, 500):
            reference = np.asarray(Image.fromarray(raw[index]).resize((size, size), Image.Resampling.BILINEAR))
            assert np.abs(dataset.train.images[index, 0].astype(int) - reference).max() <= 1
    digits = load_dataset("digits", image_size=32)
    assert digits.image_shape == (1, 32, 32) and digits.mean != load_dataset("digits").mean


# --- statistics and normalisation -------------------------------------------------------------


@pytest.mark.parametrize("spec", ["digits", "npz:cifar10-subset.npz"])
def test_mean_std_match_training_pixels(request, spec):
    if spec.startswith("npz:"):
        spec = f"npz:{shared_file(request.getfixturevalue('shared_data'), spec[4:])}"
    dataset = load_dataset(spec)
    pixels = torch.from_numpy(dataset.train.images).double() / 255

    np.testing.assert_allclose(dataset.mean, pixels.mean(dim=(0, 2, 3)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(dataset.std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-9)
    normalised = normalize(torch.from_numpy(dataset.train.images), dataset.mean, dataset.std)
    assert normalised.dtype == torch.float32
    np.testing.assert_allclose(normalised.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(normalised.std(dim=(0, 2, 3), unbiased=False).numpy(), 1, atol=1e-4)


def test_normalize_rejects_float_input_and_channel_mismatch():
    with pytest.raises(TypeError):
        normalize(torch.zeros(1, 1, 4, 4), (0.5,), (0.2,))
    with pytest.raises(ValueError):
        normalize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (0.5,), (0.2,))


# --- partitions -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    dataset = load_dataset("digits")
    return np.concatenate([dataset.train.labels, dataset.test.labels])


def assert_is_partition(parts, total: int) -> None:
    together = np.concatenate(parts)
    assert len(together) == total and len(np.unique(together)) == total


def test_partition_covers_every_sample_once_and_is_deterministic(digit_labels):
    parts = partition(digit_labels, 10, "dirichlet:0.5", seed=7)

    assert len(parts) == 10 and min(len(part) for part in parts) >= 1
    assert_is_partition(parts, len(digit_labels))
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(digit_labels, 10, "dirichlet:0.5", seed=7)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition(digit_labels, 10, "dirichlet:0.5", seed=8)))


def test_iid_parts_are_near_equal_and_shuffled(digit_labels):
    parts = partition(digit_labels, 7, "iid", seed=0)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert_is_partition(parts, len(digit_labels))
    # Flower's IidPartitioner cuts the table into contiguous shards; the table's shuffled order makes them random.
    assert max(part.max() - part.min() for part in parts) > 0.9 * len(digit_labels)


def test_dirichlet_label_skew_is_visible(digit_labels):
    def mean_entropy(scheme):
        return entropy_per_holder(class_counts(digit_labels, partition(digit_labels, 10, scheme, seed=1), 10))

    iid, mild, strong = mean_entropy("iid"), mean_entropy("dirichlet:10"), mean_entropy("dirichlet:0.1")
    assert iid > 0.95 * np.log(10)
    assert strong < 0.6 * iid < mild


def test_dirichlet_redraws_until_every_holder_has_the_minimum(digit_labels):
    parts = partition(digit_labels, 30, "dirichlet:0.3", seed=2, min_size=10)
    assert min(len(part) for part in parts) >= 10
    assert_is_partition(parts, len(digit_labels))


def test_thousand_holders_on_digits(digit_labels):
    start = time.perf_counter()
    parts = partition(digit_labels, 1000, "iid", seed=0)
    elapsed = time.perf_counter() - start

    assert len(parts) == 1000 and min(len(part) for part in parts) >= 1
    assert_is_partition(parts, len(digit_labels))
    assert elapsed < 4.0  # one Flower partition per holder, about 1.5 ms each


def test_partition_errors_are_clear(digit_labels):
    with pytest.raises(UsageError, match="at least 1 sample"):
        partition(digit_labels[:5], 6, "iid", seed=0)
    with pytest.raises(UsageError, match="at most 179 holders"):
        partition(digit_labels, 200, "dirichlet:0.5", seed=0, min_size=10)
    for scheme, fragments in (
        ("dirichlet:abc", ("ALPHA", "a number > 0", "'abc'", "dirichlet:ALPHA[,BALANCING]")),
        ("dirichlet:-1", ("ALPHA",)),
        ("dirichlet:", ("ALPHA",)),
        ("dirichlet", ("ALPHA is required",)),
        ("dirichlet:0.5,maybe", ("BALANCING", "true or false")),
        ("shards", ("unknown partition scheme", "did you mean 'shard'?", "inner-dirichlet:ALPHA", "natural")),
        ("iid:3", ("iid takes no argument",)),
        ("pathological:2,sorted", ("MODE", "random or deterministic or first-deterministic")),
        ("shard:2,0", ("SIZE", "a positive integer")),
    ):
        with pytest.raises(UsageError) as info:
            partition(digit_labels, 3, scheme, seed=0)
        message = str(info.value)
        assert "\n" not in message and all(fragment in message for fragment in fragments), message
    with pytest.raises(UsageError):
        partition(digit_labels, 0, "iid", seed=0)


def test_impossible_partitions_are_one_clear_line(digit_labels):
    """What Flower refuses, and what it allows but leaves a holder short of its minimum, both name the fix."""
    for holders, scheme, min_size, fragments in (
        (10, "exponential", 2, ("ExponentialPartitioner cannot split 1797 samples among 10 holders", "fewer holders")),
        (14, "square", 2, ("gives holder 0 1 of 1797 samples", "fewer than the 2 each of 14 holders needs", "linear")),
        (1000, "dirichlet:0.1", 1, ("DirichletPartitioner", "max number of attempts", "larger ALPHA")),
        (10, "pathological:11", 1, ("PathologicalPartitioner", "num_classes_per_partition")),
        (10, "shard:2,100", 1, ("ShardPartitioner", "fewer SHARDS or a smaller SIZE")),
    ):
        with pytest.raises(UsageError) as info:
            partition(digit_labels, holders, scheme, seed=0, min_size=min_size)
        message = str(info.value)
        assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_partitions_leaving_samples_unused_say_how_many(digit_labels, caplog):
    parts = partition(digit_labels, 10, "shard:2,50", seed=0)
    assert [len(part) for part in parts] == [100] * 10 and len(np.unique(np.concatenate(parts))) == 1000
    assert "leaves 797 of 1797 samples to no holder" in caplog.text


def test_split_holder(digit_labels):
    holder = partition(digit_labels, 4, "iid", seed=0)[1]
    train, test = split_holder(holder, 0.25, seed=11)

    assert len(test) == round(0.25 * len(holder)) and len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), holder)
    again = split_holder(holder, 0.25, seed=11)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, split_holder(holder, 0.25, seed=12)[1])
    single_train, single_test = split_holder(np.array([42]), 0.5, seed=0)
    assert single_train.tolist() == [42] and len(single_test) == 0
    assert len(split_holder(holder, 0.0, seed=0)[1]) == 0
    with pytest.raises(UsageError):
        split_holder(holder, 1.0, seed=0)


def test_class_counts_and_plot(digit_labels, tmp_path):
    parts = partition(digit_labels, 12, "dirichlet:0.3", seed=4)
    counts = class_counts(digit_labels, parts, 10)

    assert counts.shape == (12, 10)
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(digit_labels))
    np.testing.assert_array_equal(counts.sum(axis=1), [len(part) for part in parts])
    for holders, counts_to_plot in (
        (12, counts),
        (1000, class_counts(digit_labels, np.array_split(np.arange(len(digit_labels)), 1000), 10)),
    ):
        path = tmp_path / "plots" / f"counts-{holders}.png"
        plot_class_counts(counts_to_plot, [str(d) for d in range(10)], path)
        with Image.open(path) as image:
            assert image.format == "PNG" and 400 <= image.width <= 1600 and image.height >= 300
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10


# --- augmentation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_batch(shared_data) -> torch.Tensor:
    images = read_npz(shared_file(shared_data, "cifar10-subset.npz"))["test_images"][:64]
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() / 255


def test_augment_keeps_shape_is_deterministic_and_changes_images(colour_batch):
    original = colour_batch.clone()
    first = augment(colour_batch, torch.Generator().manual_seed(5))
    second = augment(colour_batch, torch.Generator().manual_seed(5))
    other = augment(colour_batch, torch.Generator().manual_seed(6))

    assert first.shape == colour_batch.shape and first.dtype == colour_batch.dtype
    assert torch.equal(colour_batch, original)
    assert torch.equal(first, second) and not torch.equal(first, other)
    changed = [not torch.equal(a, b) for a, b in zip(first, colour_batch)]
    assert sum(changed) > 50


def test_augment_flip_only_flips(colour_batch):
    out = augment(colour_batch, torch.Generator().manual_seed(0), crop_padding=0)
    flipped = [torch.equal(o, x.flip(-1)) for o, x in zip(out, colour_batch)]
    kept = [torch.equal(o, x) for o, x in zip(out, colour_batch)]

    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_augment_crop_only_is_a_shifted_window(colour_batch):
    padding = 3
    out = augment(colour_batch, torch.Generator().manual_seed(1), crop_padding=padding, flip=False)
    padded = torch.nn.functional.pad(colour_batch, (padding,) * 4)
    height, width = colour_batch.shape[-2:]
    offsets = []
    for image, source in zip(out, padded):
        matches = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(image, source[:, dy : dy + height, dx : dx + width])
        ]
        assert matches, "an augmented image is not a window of its padded original"
        offsets.append(matches[0])
    assert len(set(offsets)) > 10


# --- errors ---------------------------------------------------------------------------------


def test_unknown_dataset_specs():
    assert_data_error(lambda: load_dataset("imagenet"), "imagenet", "digits", "medmnist:NAME[@SIZE]", "sites:PATH")
    message = assert_data_error(lambda: load_dataset("medmnist:organmnist3d", download=False), "organmnist3d", "3D")
    assert "pneumoniamnist" in message and "organsmnist" in message and "chestmnist" not in message
    assert_data_error(lambda: load_dataset("medmnist:mnist", download=False), "not a MedMNIST set", "dermamnist")
    with pytest.raises(UsageError, match="image size"):
        load_dataset("digits", image_size=0)


def test_npz_errors_name_path_and_problem(shared_data, tmp_path):
    raw = read_npz(shared_file(shared_data, "breastmnist.npz"))
    missing = tmp_path / "missing.npz"
    assert_data_error(lambda: load_dataset(f"npz:{missing}"), missing, "train_images")

    def check(name, arrays, *fragments):
        path = tmp_path / name
        np.savez(path, **arrays)
        assert_data_error(lambda: load_dataset(f"npz:{path}"), path, *fragments)

    check("keys.npz", {"train_images": raw["train_images"], "train_labels": raw["train_labels"]}, "'test_images'")
    check("float.npz", {**raw, "train_images": raw["train_images"] / 255.0}, "train_images", "float64", "uint8")
    check("length.npz", {**raw, "test_labels": raw["test_labels"][:-3]}, "test_labels", "153 labels for 156 images")
    check("negative.npz", {**raw, "val_labels": raw["val_labels"].astype(np.int64) - 1}, "val_labels", "negative")
    check("shape.npz", {**raw, "test_images": raw["test_images"][:, :20]}, "mixes image shapes")
    check("float_labels.npz", {**raw, "train_labels": raw["train_labels"].astype(float)}, "train_labels", "integer")
    check("val_half.npz", {**{k: v for k, v in raw.items() if k != "val_labels"}}, "'val_labels'")
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello")
    assert_data_error(lambda: load_dataset(f"npz:{not_zip}"), not_zip)
    single = tmp_path / "single.npy"
    np.save(single, raw["train_images"])
    assert_data_error(lambda: load_dataset(f"npz:{single}"), single, "single array")


def test_medmnist_missing_file_without_download(tmp_path):
    assert_data_error(
        lambda: load_dataset("medmnist:breastmnist", data_dir=tmp_path, download=False), tmp_path / "breastmnist.npz"
    )


def test_folder_errors_name_path(tmp_path):
    missing = tmp_path / "missing"
    assert_data_error(lambda: load_dataset(f"folder:{missing}"), missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_data_error(lambda: load_dataset(f"folder:{empty}"), empty, "no class folders")
    (empty / "normal").mkdir()
    (empty / "normal" / "readme.txt").write_text("no images here")
    assert_data_error(lambda: load_dataset(f"folder:{empty}"), empty / "normal", "no images")


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_folder_corrupt_image_names_file(tmp_path, content):
    for label in ("a", "b"):
        (tmp_path / "set" / label).mkdir(parents=True)
        for index in range(3):
            solid("RGB", (40, 40), (index * 50, 10, 200)).save(tmp_path / "set" / label / f"{index}.png")
    bad = tmp_path / "set" / "b" / "broken.PNG"
    good_bytes = (tmp_path / "set" / "a" / "0.png").read_bytes()
    bad.write_bytes(b"definitely not a PNG" if content == "garbage" else good_bytes[: len(good_bytes) // 2])
    assert_data_error(lambda: load_dataset(f"folder:{tmp_path / 'set'}"), bad)
