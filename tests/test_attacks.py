"""The curious server's attacks: known plaintext, reversing, feature leakage, cross-key (DESIGN.md section 4)."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from clients.augconv import AugConv
from clients.keys import HolderKey
from clients.morphing import morph
from clients.secrets import HolderSecrets, channel_order, draw_key
from server.attacks import cross_key, feature_leakage
from server.attacks.common import normalized_images
from server.attacks.cross_key.__main__ import main as cross_key_main
from server.attacks.feature_leakage.__main__ import main as feature_leakage_main
from server.attacks.known_plaintext import (
    attack_curve,
    full_rank,
    known_images_needed,
    known_images_spanning,
    plaintext_rank,
)
from server.attacks.known_plaintext.__main__ import main as known_plaintext_main
from server.attacks.reversing import evaluate_reversing
from server.attacks.reversing.__main__ import main as reversing_main
from simulation.cli import FRESH_KEYS_NOTE, setup_model
from simulation.data import load_dataset


@pytest.fixture(scope="module")
def cifar(shared_data):
    path = shared_data / "cifar10-subset.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent from the shared data folder")
    return load_dataset(f"npz:{path}")


@pytest.fixture(scope="module")
def cifar16(shared_data):
    path = shared_data / "cifar10-subset.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent from the shared data folder")
    return load_dataset(f"npz:{path}", image_size=16)


def random_images(count, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8)



# --- known plaintext ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, block_size, image_shape, padding, needed",
    [
        ("repeated", 32, (3, 32, 32), 0, 1),  # 96 block rows of 32 values per image
        ("repeated", 64, (3, 32, 32), 0, 2),  # 48 block rows, 64 unknowns
        ("repeated", 34, (3, 32, 32), 1, 1),  # padded rows: 32 unknowns per row, 96 rows with data
        ("blocks", 32, (3, 32, 32), 0, 32),
        ("blocks", 34, (3, 32, 32), 1, 32),
        ("dense", 768, (3, 16, 16), 0, 768),
        ("dense", 300, (3, 8, 8), 1, 192),  # padding coordinates need no equations
    ],
)
def test_known_images_needed(family, block_size, image_shape, padding, needed):
    assert known_images_needed(family, block_size, image_shape, padding) == needed


def test_known_plaintext_recovers_a_repeated_key_from_one_image(cifar):
    key = HolderKey.generate(cifar.image_shape, family="repeated", block_size=32, seed=11)
    images = torch.from_numpy(cifar.test.images[:17])
    (point,) = attack_curve(key, images, mean=cifar.mean, std=cifar.std, known_counts=[1], test_images=16)
    assert point["psnr_db"] >= 60
    assert point["ssim"] > 0.999
    assert point["matrix_error"] < 1e-3


def test_known_plaintext_does_not_recover_a_dense_key_from_ten_images(cifar16):
    # Dense keys over the whole 3x32x32 image need 3072 known images; the smaller 3x16x16 domain (N = 768)
    # shows the same thing at a fraction of the cost.
    key = HolderKey.generate(cifar16.image_shape, family="dense", seed=12)
    images = torch.from_numpy(cifar16.test.images[:786])
    few, enough = attack_curve(key, images, mean=cifar16.mean, std=cifar16.std, known_counts=[10, 770], test_images=16)
    assert few["psnr_db"] < 25 and few["ssim"] < 0.6
    assert few["matrix_error"] > 0.5
    assert enough["psnr_db"] >= 50  # with N known images it does break
    # what is specific to each image: the broken key re-identifies every image, ten known ones much less
    assert enough["residual_correlation"] > 0.99 and enough["reidentification"] == 1.0 and enough["chance"] == 1 / 16
    assert few["residual_correlation"] < enough["residual_correlation"] - 0.2
    assert 0 < few["null_ssim"] < 1 and few["null_correlation"] > 0  # the mean image resembles every CIFAR image a little


def test_known_plaintext_blocks_needs_q_images():
    key = HolderKey.generate((1, 8, 8), family="blocks", block_size=8, seed=3)
    images = random_images(40, (1, 8, 8))
    short, exact = attack_curve(key, images, mean=(0.5,), std=(0.3,), known_counts=[7, 8], test_images=8)
    assert short["psnr_db"] < 30
    assert exact["psnr_db"] > 60


def test_known_plaintext_command(tmp_path):
    code = known_plaintext_main(["--key-family", "blocks", "--known", "1,8", "--test-images", "4", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "known_plaintext.json").read_text())
    assert [point["known_images"] for point in report["curve"]] == [1, 8]
    assert report["known_images_needed"] == 8
    one, eight = report["curve"]
    assert one["rank"] < eight["rank"] <= report["full_rank"] == 64  # the rank each count reached, out of N
    assert (tmp_path / "known_plaintext.png").stat().st_size > 0


def test_known_images_spanning_measures_what_real_images_need():
    # Most digits images have background (a constant after normalisation) in their first and last columns, so their
    # 8-pixel rows lie in the 7 directions with d[0] = d[7]; test image 0 also leaves column 1 empty: 6 directions.
    digits = load_dataset("digits")
    plain = normalized_images(torch.from_numpy(digits.test.images[:64]), digits.mean, digits.std)
    shape = dict(family="repeated", block_size=8)
    assert full_rank("repeated", 8, digits.image_shape) == 8
    assert plaintext_rank(plain[:1], **shape) == 6
    assert plaintext_rank(plain[:56], **shape) == 8
    needed = known_images_spanning(plain[:56], plain[56:], **shape)
    assert needed > known_images_needed("repeated", 8, digits.image_shape) == 1
    assert plaintext_rank(plain[:needed], **shape) == 8
    key = HolderKey.generate(digits.image_shape, family="repeated", seed=4)
    few, enough = attack_curve(key, plain, mean=digits.mean, std=digits.std, known_counts=[1, needed], test_images=8)
    assert few["rank"] == 6 and few["psnr_db"] < 40  # 1 image "suffices" only for generic images
    assert enough["rank"] == 8 and enough["psnr_db"] > 60
    # generic images need the computed count exactly; more known images never shrink the span
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert known_images_spanning(noise[:4], noise[4:], family="blocks", block_size=8) is None
    assert known_images_spanning(noise[:10], noise[10:], family="blocks", block_size=8, start=3) == 8
    assert known_images_spanning(noise[:3], noise[:2], family="repeated", block_size=8) == 1


# --- reversing ------------------------------------------------------------------------------------
def small_conv(channels=16, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(3, channels, 3, padding=1, bias=bias)


@pytest.mark.parametrize("family, padding", [("dense", 0), ("repeated", 0), ("blocks", 1)])
def test_reversing_recovers_order_and_key_when_conv_is_known(family, padding):
    # 3x8x8 images, 16 channels: C is 192 x 1024 (or 300 x 1024 padded), of full row rank.
    conv = small_conv()
    key = HolderKey.generate((3, 8, 8), family=family, padding=padding, seed=5)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1)).tolist()
    report = evaluate_reversing(conv, key, order, random_images(8, (3, 8, 8)), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert report["full_row_rank"]
    assert report["order_recovered"]
    assert report["bias_reveals_order"] is None  # no bias: the order came from the weights alone
    assert report["inverse_matrix_error"] < 1e-4
    assert report["psnr_db"] >= 60


def test_reversing_reads_the_order_off_the_bias():
    conv = small_conv(bias=True)
    key = HolderKey.generate((3, 8, 8), family="repeated", seed=5)
    order = list(reversed(range(16)))
    report = evaluate_reversing(conv, key, order, random_images(4, (3, 8, 8)), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert report["bias_reveals_order"] is True and report["order_recovered"]


def test_reversing_fails_without_full_row_rank():
    # 2 channels on 3x8x8: C is 192 x 128, so M^-1 is not determined by C^ac.
    conv = small_conv(channels=2)
    key = HolderKey.generate((3, 8, 8), family="dense", seed=5)
    report = evaluate_reversing(conv, key, [1, 0], random_images(4, (3, 8, 8)), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert not report["full_row_rank"]
    assert report["psnr_db"] < 30
    assert report["reidentification"] < 1.0 and report["chance"] == 0.25


def test_reversing_command(tmp_path):
    code = reversing_main(["--holder-seed", "0", "--test-images", "4", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "reversing.json").read_text())
    assert report["order_recovered"] and report["full_row_rank"]


# --- feature leakage ------------------------------------------------------------------------------
def test_feature_leakage_scores_an_identity_layer_as_full_leak_and_noise_as_none():
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0  # channel 0 copies the image
        conv.weight[1, 0, 1, 1] = -1.0  # channel 1 is its negative, as recognisable
    key = HolderKey.generate((1, 16, 16), family="repeated", seed=2)
    augconv = AugConv.from_conv(conv, key)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    maps = feature_leakage.feature_maps(augconv, morph(images, key), (16, 16))
    result = feature_leakage.leakage(maps, images)
    assert np.allclose(result["ssim"], 1, atol=1e-4)
    assert np.allclose(np.abs(result["correlation"]), 1, atol=1e-4)
    noise = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert feature_leakage.leakage(noise, images)["best_channel_ssim_mean"] < 0.3


def test_feature_leakage_command(tmp_path):
    assert feature_leakage_main(["--samples", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "feature_leakage.json").read_text())
    assert np.array(report["per_image_channel_ssim"]).shape == (2, 32)
    assert (tmp_path / "feature_leakage.png").stat().st_size > 0


# --- cross-key ------------------------------------------------------------------------------------
def test_cross_key_diagonal_beats_off_diagonal(tmp_path):
    dataset = load_dataset("digits")
    conv = setup_model("cnn", dataset, seed=0)[0].first
    secrets = [HolderSecrets.from_holder_seed(0, i) for i in range(3)]
    keys = [draw_key(s, dataset.image_shape, family="repeated", block_size=None, entries="uniform", padding=0) for s in secrets]
    orders = [channel_order(s, "federation", conv.out_channels).tolist() for s in secrets]
    backbone, augconvs, test_sets = cross_key.train_demo_backbone("cnn", dataset, conv, keys, orders, epochs=3, batch_size=128, seed=0)
    accuracy = cross_key.cross_key_matrix(backbone, augconvs, test_sets)
    off_diagonal = accuracy[~np.eye(3, dtype=bool)]
    assert np.diag(accuracy).min() > 0.7
    assert np.diag(accuracy).min() > off_diagonal.max()
    json_path, png_path = cross_key.write_cross_key(accuracy, tmp_path, chance=0.1)
    assert json.loads(json_path.read_text())["accuracy"] == accuracy.tolist()
    assert png_path.stat().st_size > 0


def test_cross_key_marks_mismatched_domains_as_nan():
    conv = small_conv()
    keys = [HolderKey.generate((3, 8, 8), seed=1), HolderKey.generate((3, 8, 8), padding=1, seed=2)]
    conv_padded = nn.Conv2d(3, 16, 3, padding=1)
    augconvs = [AugConv.from_conv(conv, keys[0]), AugConv.from_conv(conv_padded, keys[1])]
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    images = torch.rand(4, 3, 8, 8)
    test_sets = [(morph(images, key), torch.zeros(4, dtype=torch.long)) for key in keys]
    accuracy = cross_key.cross_key_matrix(backbone, augconvs, test_sets)
    assert math.isnan(accuracy[0, 1]) and math.isnan(accuracy[1, 0])
    assert not math.isnan(accuracy[0, 0]) and not math.isnan(accuracy[1, 1])


# --- the commands' keys ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, command, argv", [
    ("known_plaintext", known_plaintext_main, ["--known", "1", "--test-images", "2"]),
    ("feature_leakage", feature_leakage_main, ["--samples", "1"]),
])
def test_attack_commands_repeat_keys_with_a_holder_seed_only(tmp_path, capsys, name, command, argv):
    def key_of(folder, *extra):
        assert command([*argv, "--holder", "1", "--seed", "5", *extra, "--out", str(tmp_path / folder)]) == 0
        return json.loads((tmp_path / folder / f"{name}.json").read_text())["key"]["fingerprint"]

    seeded = draw_key(HolderSecrets.from_holder_seed(3, 1), (1, 8, 8), family="repeated", block_size=None,
                      entries="uniform", padding=0)
    assert key_of("a", "--holder-seed", "3") == key_of("b", "--holder-seed", "3") == seeded.fingerprint
    assert FRESH_KEYS_NOTE not in capsys.readouterr().out
    assert key_of("c") != key_of("d")
    assert capsys.readouterr().out.count(FRESH_KEYS_NOTE) == 2


def test_cross_key_command_help_keeps_its_run_meaning(capsys):
    with pytest.raises(SystemExit):
        cross_key_main(["--help"])
    assert "--run RUN_DIR use a finished simulation.run folder (its global backbone" in " ".join(capsys.readouterr().out.split())
