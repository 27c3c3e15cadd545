"""Image metrics, key-space figures and the key comparison (``python -m simulation.keys compare``)."""

import json
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from clients.keys import HolderKey
from simulation import keys as key_report
from simulation.data import load_dataset
from simulation.imagemetrics import (
    psnr,
    psnr_per_image,
    scale_to_reference,
    ssim,
    ssim_per_image,
)
from simulation.keys import (
    channel_orders,
    compare_keys,
    format_key_table,
    holder_keys,
    matrix_keyspace_log10,
    order_keyspace_log10,
    setup_model,
    write_key_report,
)

WANG = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}



# --- SSIM and PSNR --------------------------------------------------------------------------------
def noisy_pair(shape, seed, data_range=1.0):
    rng = np.random.default_rng(seed)
    # a smooth image, so that SSIM is far from both 0 and 1
    base = np.cumsum(np.cumsum(rng.random(shape), axis=-1), axis=-2)
    base = data_range * (base - base.min()) / (base.max() - base.min())
    noisy = np.clip(base + 0.1 * data_range * rng.standard_normal(shape), 0, data_range)
    return base, noisy


@pytest.mark.parametrize("shape, data_range", [((32, 32), 1.0), ((3, 32, 32), 1.0), ((1, 28, 28), 255.0), ((3, 13, 11), 2.0)])
def test_ssim_and_psnr_match_skimage(shape, data_range):
    a, b = noisy_pair(shape, seed=len(shape), data_range=data_range)
    channel_axis = 0 if len(shape) == 3 else None
    expected = structural_similarity(a, b, data_range=data_range, channel_axis=channel_axis, **WANG)
    assert 0.2 < expected < 0.95
    assert ssim(a, b, data_range=data_range) == pytest.approx(expected, abs=1e-9)
    assert psnr(a, b, data_range=data_range) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=data_range), abs=1e-9)


def test_ssim_on_images_smaller_than_the_window_matches_skimage_with_the_largest_fitting_window():
    a, b = noisy_pair((1, 8, 8), seed=3)
    expected = structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=7, **WANG)
    assert ssim(a, b, data_range=1.0) == pytest.approx(expected, abs=1e-9)


def test_batched_metrics_match_one_image_at_a_time():
    pairs = [noisy_pair((3, 16, 16), seed) for seed in range(4)]
    a = np.stack([p[0] for p in pairs])
    b = np.stack([p[1] for p in pairs])
    assert np.allclose(ssim_per_image(a, b, data_range=1.0), [ssim(x, y, data_range=1.0) for x, y in pairs], atol=1e-12)
    assert np.allclose(psnr_per_image(a, b, data_range=1.0), [psnr(x, y, data_range=1.0) for x, y in pairs], atol=1e-12)
    assert ssim(a[0], a[0], data_range=1.0) == pytest.approx(1.0) and psnr(a[0], a[0], data_range=1.0) == math.inf


def test_scale_to_reference_maps_each_image_onto_its_reference_range():
    images = torch.tensor([[[[-5.0, 5.0], [0.0, 10.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    reference = torch.tensor([[[[0.2, 0.4], [0.3, 0.6]]], [[[0.0, 1.0], [0.5, 0.5]]]])
    scaled = scale_to_reference(images, reference)
    assert scaled[0].min() == pytest.approx(0.2) and scaled[0].max() == pytest.approx(0.6)
    assert scaled[0, 0, 0, 1] == pytest.approx(0.2 + 0.4 * 10 / 15)
    assert torch.allclose(scaled[1], torch.full((1, 2, 2), 0.5, dtype=torch.float64))  # constant: middle of the range


# --- key space ------------------------------------------------------------------------------------
def test_the_papers_success_rate_is_one_over_64_factorial():
    log10 = order_keyspace_log10(64)
    assert log10 == pytest.approx(math.log10(math.factorial(64)), abs=1e-9)
    assert -log10 == pytest.approx(-89.1, abs=0.05)
    assert 10 ** -log10 == pytest.approx(7.9e-90, rel=0.01)


def test_matrix_keyspace_counts_free_entries_per_family():
    shape = (1, 8, 8)
    repeated = HolderKey.generate(shape, family="repeated", entries="integer", seed=0)
    blocks = HolderKey.generate(shape, family="blocks", entries="uniform", seed=0)
    dense = HolderKey.generate(shape, family="dense", entries="uniform", seed=0)
    assert matrix_keyspace_log10(repeated) == pytest.approx(64 * math.log10(255))
    assert matrix_keyspace_log10(blocks) == pytest.approx(64 * 8 * 23 * math.log10(2))
    assert matrix_keyspace_log10(dense) == pytest.approx(64 * 64 * 23 * math.log10(2))


# --- holders' keys and orders ---------------------------------------------------------------------
def test_holder_keys_are_reproducible_and_distinct():
    first = holder_keys((1, 8, 8), 3, seed=4)
    again = holder_keys((1, 8, 8), 3, seed=4)
    assert [k.fingerprint for k in first] == [k.fingerprint for k in again]
    assert len({k.fingerprint for k in first}) == 3
    assert first[0].fingerprint != holder_keys((1, 8, 8), 1, seed=5)[0].fingerprint


def test_channel_orders_modes():
    federation = channel_orders(8, 3, "federation", seed=0)
    holder = channel_orders(8, 3, "holder", seed=0)
    assert all(order == federation[0] for order in federation) and sorted(federation[0]) == list(range(8))
    assert len({tuple(order) for order in holder}) == 3
    assert channel_orders(8, 3, "none", seed=0) is None


# --- the comparison -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_compare_keys_rows_and_report(digits, tmp_path):
    model, _ = setup_model("cnn", digits, seed=0)
    conv = model.first
    keys = holder_keys(digits.image_shape, 2, family="repeated", seed=1) + holder_keys(digits.image_shape, 1, family="dense", seed=2)
    images = torch.from_numpy(digits.train.images)
    orders = channel_orders(conv.out_channels, 3, "holder", seed=0)
    rows = compare_keys(keys, conv, images, mean=digits.mean, std=digits.std, order=orders, backbone=model.backbone, timing_batch=8, timing_repeats=1)
    assert [row["fingerprint"] for row in rows] == [key.fingerprint for key in keys]
    repeated, dense = rows[0], rows[2]
    assert repeated["known_images_needed"] == 1 and dense["known_images_needed"] == 64
    assert repeated["order_keyspace_log10"] == pytest.approx(math.log10(math.factorial(32)))
    assert dense["augconv_bytes"] > repeated["augconv_bytes"] > 0
    for row in rows:
        assert row["kpa_psnr_db"] > 60  # the demonstration breaks every key with the computed number of images
        assert row["morph_ssim"] < 0.5 and row["morph_psnr_db"] < 15
        assert min(row["augconv_ms"], row["conv_ms"], row["augconv_step_ms"], row["step_ms"]) > 0
    table = format_key_table(rows)
    assert all(key.fingerprint in table for key in keys)
    json_path, png_path = write_key_report(rows, tmp_path, keys, images[:8], mean=digits.mean, std=digits.std, context={"dataset": "digits"})
    report = json.loads(json_path.read_text())
    assert [row["fingerprint"] for row in report["holders"]] == [key.fingerprint for key in keys]
    assert "matrix_keyspace_log10" in report["definitions"]
    assert png_path.stat().st_size > 0


def test_compare_keys_without_enough_images_says_so(digits):
    conv = setup_model("cnn", digits, seed=0)[0].first
    key = HolderKey.generate(digits.image_shape, family="dense", seed=1)
    (row,) = compare_keys([key], conv, torch.from_numpy(digits.train.images[:20]), mean=digits.mean, std=digits.std, timing_repeats=1)
    assert row["kpa_psnr_db"] is None and "needs 72" in row["kpa_note"]
    assert row["order_keyspace_log10"] == 0.0  # no secret order
    assert row["step_ms"] is None  # no backbone given: no training step timed


def test_compare_command(tmp_path, capsys):
    code = key_report.main(["compare", "--holders", "2", "--samples", "4", "--timing-batch", "8", "--timing-repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "fingerprint" in out and "keys.json" in out
    assert (tmp_path / "keys.json").is_file() and (tmp_path / "morph.png").is_file()


def test_compare_command_bad_block_size_is_a_one_line_error(tmp_path, capsys):
    code = key_report.main(["compare", "--block-size", "7", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: block size q = 7 does not divide N = 64") and "\n" not in err
