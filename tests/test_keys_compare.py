"""Image metrics, key-space figures, the key comparison (simulation.key_table) and its command
(``python -m simulation.keys compare``), whose keys come from holder-side material only (simulation.cli)."""

import argparse
import decimal
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from clients.holder import KEY_FILE, holder_home
from clients.keys import HolderKey
from clients.secrets import SECRET_BYTES, SECRETS_FILE, HolderSecrets, channel_order, draw_key
from simulation import keys as key_report
from simulation.cli import FRESH_KEYS_NOTE, add_setup_arguments, setup_from_arguments, setup_model
from simulation.config import ExperimentConfig
from simulation.data import load_dataset
from simulation.imagemetrics import (
    psnr,
    psnr_per_image,
    scale_to_reference,
    ssim,
    ssim_per_image,
)
from simulation.key_table import (
    compare_keys,
    format_key_table,
    matrix_keyspace_log10,
    order_guess_probability,
    order_keyspace_log10,
    reciprocal_text,
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


def test_the_blind_guess_probability_is_one_over_beta_factorial_for_any_channel_count():
    assert order_guess_probability(32) == pytest.approx(1 / math.factorial(32), rel=1e-12)
    assert order_guess_probability(64) == pytest.approx(7.9e-90, rel=0.01)
    assert order_guess_probability(170) == pytest.approx(1 / math.factorial(170), rel=1e-9)  # the last a float64 holds
    assert order_guess_probability(None) == 1.0  # no secret order: nothing to guess
    for channels in (171, 512, 4096):  # 10.0 ** -log10 would be 0 (or a subnormal with lost digits)
        exact = decimal.Context(prec=20).divide(1, math.factorial(channels))
        assert order_guess_probability(channels) == f"{exact:.2e}"
        assert reciprocal_text(order_keyspace_log10(channels)) == f"{exact:.1e}"
    assert order_guess_probability(512) == "2.88e-1167"
    assert reciprocal_text(math.log10(1 / 9.96e-5)) == "1.0e-4"  # a mantissa rounding up to 10 carries
    assert reciprocal_text(0.0) == "1"


def table_cell(table: str, column: str, row: int = 0) -> str:
    """One cell of format_key_table's output: cells are right-aligned under their header."""
    header, dashes, *lines = table.splitlines()
    end = header.index(column) + len(column)
    return lines[row][dashes.rfind(" ", 0, end) + 1 : end].strip()


def guess_table_row(channels, tmp_path):
    """The printed table and keys.json of one repeated key behind a first layer of `channels` channels, in a secret
    order."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, channels, 3, padding=1)
    key = HolderKey.generate((1, 8, 8), family="repeated", seed=0)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    rows = compare_keys([key], conv, images, mean=[0.5], std=[0.25], order=list(range(channels))[::-1], timing_batch=2,
                        timing_repeats=1, timing_max_repeats=5, known_plaintext=False, metric_images=2)
    json_path, _, _ = write_key_report(rows, tmp_path, [key], images, mean=[0.5], std=[0.25])
    return format_key_table(rows), json.loads(json_path.read_text())["holders"][0]


@pytest.mark.parametrize("channels, shown, stored", [
    (32, f"1/32! = {1 / math.factorial(32):.1e}", 1 / math.factorial(32)),
    (64, "1/64! = 7.9e-90", pytest.approx(7.88e-90, rel=1e-3)),  # the MpLe paper's figure (VGG-16's first layer)
    (512, "1/512! = 2.9e-1167", "2.88e-1167"),  # a float would print 0
])
def test_the_table_prints_the_blind_guess_probability_and_keys_json_keeps_it(tmp_path, channels, shown, stored):
    table, saved = guess_table_row(channels, tmp_path)
    assert table_cell(table, "order guess P") == shown
    assert saved["order_guess_probability"] == (pytest.approx(stored, rel=1e-9) if isinstance(stored, float) else stored)
    assert saved["order_channels"] == channels


def test_matrix_keyspace_counts_free_entries_per_family():
    shape = (1, 8, 8)
    repeated = HolderKey.generate(shape, family="repeated", entries="integer", seed=0)
    blocks = HolderKey.generate(shape, family="blocks", entries="uniform", seed=0)
    dense = HolderKey.generate(shape, family="dense", entries="uniform", seed=0)
    assert matrix_keyspace_log10(repeated) == pytest.approx(64 * math.log10(255))
    assert matrix_keyspace_log10(blocks) == pytest.approx(64 * 8 * 23 * math.log10(2))
    assert matrix_keyspace_log10(dense) == pytest.approx(64 * 64 * 23 * math.log10(2))


# --- holders' keys and orders ---------------------------------------------------------------------
def seeded_keys(image_shape, holders, *, holder_seed, family="repeated", entries="uniform"):
    """Keys as `--holder-seed` draws them: from each holder's own secrets, never from the experiment seed."""
    return [draw_key(HolderSecrets.from_holder_seed(holder_seed, i), image_shape, family=family, block_size=None,
                     entries=entries, padding=0) for i in range(holders)]


def test_holder_keys_are_reproducible_and_distinct():
    first = seeded_keys((1, 8, 8), 3, holder_seed=4)
    again = seeded_keys((1, 8, 8), 3, holder_seed=4)
    assert [k.fingerprint for k in first] == [k.fingerprint for k in again]
    assert len({k.fingerprint for k in first}) == 3
    assert first[0].fingerprint != seeded_keys((1, 8, 8), 1, holder_seed=5)[0].fingerprint
    fresh = HolderSecrets.fresh()
    assert draw_key(fresh, (1, 8, 8), family="repeated", block_size=None, entries="uniform", padding=0).fingerprint \
        not in {k.fingerprint for k in first}


def test_channel_orders_modes():
    secrets = [HolderSecrets.from_holder_seed(0, i) for i in range(3)]
    federation = [channel_order(s, "federation", 8).tolist() for s in secrets]
    holder = [channel_order(s, "holder", 8).tolist() for s in secrets]
    assert all(order == federation[0] for order in federation) and sorted(federation[0]) == list(range(8))
    assert len({tuple(order) for order in holder}) == 3
    assert channel_order(secrets[0], "none", 8).tolist() == list(range(8))


# --- the comparison -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_compare_keys_rows_and_report(digits, tmp_path):
    model, _ = setup_model("cnn", digits, seed=0)
    conv = model.first
    keys = seeded_keys(digits.image_shape, 2, holder_seed=1) + seeded_keys(digits.image_shape, 1, holder_seed=2, family="dense")
    images = torch.from_numpy(digits.train.images)
    orders = [channel_order(HolderSecrets.from_holder_seed(0, i), "holder", conv.out_channels).tolist() for i in range(3)]
    rows = compare_keys(keys, conv, images, mean=digits.mean, std=digits.std, order=orders, backbone=model.backbone, timing_batch=8, timing_repeats=1)
    assert [row["fingerprint"] for row in rows] == [key.fingerprint for key in keys]
    repeated, dense = rows[0], rows[2]
    assert repeated["known_images_needed"] == 1 and dense["known_images_needed"] == 64
    assert repeated["order_keyspace_log10"] == pytest.approx(math.log10(math.factorial(32)))
    assert dense["augconv_bytes"] > repeated["augconv_bytes"] > 0
    for row in rows:
        assert row["kpa_psnr_db"] > 60  # the demonstration breaks every key with as many images as span the decrypted ones
        assert row["kpa_known_images"] >= 1 and row["kpa_rank"] <= row["kpa_full_rank"]
        assert row["morph_ssim"] < 0.5 and row["morph_psnr_db"] < 15
        assert min(row["augconv_ms"], row["conv_ms"], row["augconv_step_ms"], row["step_ms"]) > 0
    table = format_key_table(rows)
    assert all(key.fingerprint in table for key in keys)
    json_path, png_path, tradeoff_path = write_key_report(rows, tmp_path, keys, images[:8], mean=digits.mean, std=digits.std, context={"dataset": "digits"})
    report = json.loads(json_path.read_text())
    assert [row["fingerprint"] for row in report["holders"]] == [key.fingerprint for key in keys]
    assert "matrix_keyspace_log10" in report["definitions"]
    assert png_path.stat().st_size > 0
    assert repeated["ciphertext_only_residual_correlation"] > 0.8  # a repeated key falls to its block statistics
    assert dense["ciphertext_only_residual_correlation"] < 0.3  # a dense key's do not determine it
    assert all(row["reversing_psnr_db"] > 30 for row in rows)  # C of full row rank: every AugConv reverses
    assert tradeoff_path.name == "keys.png" and tradeoff_path.stat().st_size > 20_000


def test_compare_keys_without_enough_images_says_so(digits):
    conv = setup_model("cnn", digits, seed=0)[0].first
    key = HolderKey.generate(digits.image_shape, family="dense", seed=1)
    (row,) = compare_keys([key], conv, torch.from_numpy(digits.train.images[:20]), mean=digits.mean, std=digits.std, timing_repeats=1)
    assert row["kpa_psnr_db"] is None and "needs 72" in row["kpa_note"]
    assert row["order_keyspace_log10"] == 0.0  # no secret order
    assert row["order_guess_probability"] == 1.0 and row["order_channels"] is None
    assert table_cell(format_key_table([row]), "order guess P") == "1"
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


def test_known_plaintext_demonstration_counts_the_images_its_images_need(digits):
    # A run's key table demonstrates on the test split's first 64 images. Test image 0 has background in its first
    # two columns and its last: its 8 rows span 6 of the 8 directions, so "the 1 known image needed" decrypted the
    # next images at 20-26 dB, while the command's first training image (7 directions) decrypted seven of its next
    # eight exactly (about 120 dB in the mean). The row now says how many images these images took, and which.
    conv = setup_model("cnn", digits, seed=0)[0].first
    (key,) = seeded_keys(digits.image_shape, 1, holder_seed=0)
    samples = digits.test.images[:64]
    (row,) = compare_keys([key], conv, samples, mean=digits.mean, std=digits.std, timing_batch=8, timing_repeats=1,
                          sample_images="test split images")
    assert row["known_images_needed"] == 1  # generic images
    assert row["kpa_needed_rank"] < row["kpa_full_rank"] == 8 and row["kpa_needed_psnr_db"] < 40
    assert row["kpa_known_images"] > 1 and row["kpa_rank"] == 8
    assert row["kpa_psnr_db"] > 60
    used = row["kpa_known_images"]
    assert row["kpa_images"] == f"known test split images 0-{used - 1}, decrypted test split images 56-63"
    table = format_key_table([row])
    assert row["kpa_images"] in table and f"{used} (rank 8/8)" in table
    # the command's images (train split, then test) give the same verdict: the key breaks
    (command_row,) = compare_keys([key], conv, np.concatenate([digits.train.images, digits.test.images]),
                                  mean=digits.mean, std=digits.std, timing_batch=8, timing_repeats=1)
    assert command_row["kpa_psnr_db"] > 60 and command_row["kpa_rank"] == 8


# --- the command's set-up: keys from holder-side material only ------------------------------------
QUICK = ["--samples", "2", "--timing-batch", "8", "--timing-repeats", "1", "--no-known-plaintext"]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_setup_arguments(parser)
    return parser.parse_args(argv)


def fingerprints(out):
    return [row["fingerprint"] for row in json.loads((out / "keys.json").read_text())["holders"]]


def test_compare_command_keys_repeat_with_a_holder_seed_and_are_fresh_without(tmp_path, capsys, digits):
    runs = {}
    for name, extra in [("seeded", ["--holder-seed", "7"]), ("seeded-again", ["--holder-seed", "7"]), ("fresh", []), ("fresh-again", [])]:
        assert key_report.main(["compare", "--holders", "2", *QUICK, "--seed", "3", *extra, "--out", str(tmp_path / name)]) == 0
        runs[name] = (fingerprints(tmp_path / name), capsys.readouterr().out)
    assert runs["seeded"][0] == runs["seeded-again"][0] == [k.fingerprint for k in seeded_keys(digits.image_shape, 2, holder_seed=7)]
    assert FRESH_KEYS_NOTE not in runs["seeded"][1]
    assert set(runs["fresh"][0]).isdisjoint(runs["fresh-again"][0])  # the same --seed, other keys
    assert runs["fresh"][1].count(FRESH_KEYS_NOTE) == 1
    context = json.loads((tmp_path / "seeded" / "keys.json").read_text())["context"]
    assert context["key_source"] == "drawn from --holder-seed (not recorded)" and "holder_seed" not in context


def test_the_experiment_seed_never_changes_keys_or_orders():
    one = setup_from_arguments(parse(["--holder-seed", "7", "--shuffle", "holder", "--seed", "1"]), holders=2)
    two = setup_from_arguments(parse(["--holder-seed", "7", "--shuffle", "holder", "--seed", "2"]), holders=2)
    assert [k.fingerprint for k in one.keys] == [k.fingerprint for k in two.keys]
    assert one.orders == two.orders == [channel_order(HolderSecrets.from_holder_seed(7, i), "holder", 32).tolist() for i in range(2)]
    assert not torch.equal(one.first_conv.weight, two.first_conv.weight)  # --seed: the first layer's initialisation


def test_old_flag_names_still_work_and_key_padding_conv_takes_the_convs_padding():
    old = setup_from_arguments(parse(["--holder-seed", "1", "--entries", "integer", "--padding", "1", "--channel-order", "none"]), holders=1)
    new = setup_from_arguments(parse(["--holder-seed", "1", "--key-entries", "integer", "--key-padding", "conv", "--shuffle", "none"]), holders=1)
    assert old.keys[0].fingerprint == new.keys[0].fingerprint
    assert (new.keys[0].padding, new.keys[0].entries) == (1, "integer")  # the cnn's first convolution pads by 1
    assert old.orders is None and new.orders is None and new.describe()["channel_order"] == "none"


def fake_run(folder: Path, digits, *, holders=2):
    """A run folder as simulation.run leaves it, for what the commands read: config.json, first_layer.pt and each
    holder's secrets.json and key.mple (no simulation is run)."""
    folder.mkdir()
    config = ExperimentConfig(holders=holders, dataset="digits", key_family="blocks", key_entries="integer", shuffle="holder", seed=11)
    (folder / "config.json").write_text(config.to_json())
    model, _ = setup_model("cnn", digits, seed=99)
    torch.save({"first": model.first.state_dict(), "backbone": model.backbone.state_dict()}, folder / "first_layer.pt")
    federation = os.urandom(SECRET_BYTES)  # shared by the run's holders, as the launcher provisions it
    secrets, keys = [], []
    for holder in range(holders):
        home = holder_home(folder, holder)
        secrets.append(HolderSecrets.fresh(federation=federation))
        secrets[-1].save(home / SECRETS_FILE)
        keys.append(draw_key(secrets[-1], digits.image_shape, family="blocks", block_size=None, entries="integer", padding=0))
        keys[-1].save(home / KEY_FILE)
    return secrets, keys, model.first


def test_run_folder_gives_the_runs_own_keys_orders_and_first_layer(tmp_path, digits, capsys):
    run = tmp_path / "run"
    secrets, keys, first = fake_run(run, digits)
    setup = setup_from_arguments(parse(["--run", str(run)]), holders=None)
    assert [k.fingerprint for k in setup.keys] == [k.fingerprint for k in keys]
    assert setup.orders == [channel_order(s, "holder", first.out_channels).tolist() for s in secrets]
    assert torch.equal(setup.first_conv.weight, first.weight)
    assert setup.describe()["key_source"] == f"from run {run}" and setup.describe()["channel_order"] == "holder"
    assert key_report.main(["compare", "--run", str(run), *QUICK, "--out", str(tmp_path / "out")]) == 0
    assert fingerprints(tmp_path / "out") == [k.fingerprint for k in keys]
    assert FRESH_KEYS_NOTE not in capsys.readouterr().out


@pytest.mark.parametrize("extra, problem", [
    (["--key-family", "dense"], "--key-family is decided by the run in --run"),
    (["--holder-seed", "3"], "--holder-seed is decided by the run in --run"),
    (["--holders", "3"], "has holders 0..1"),
])
def test_run_folder_refuses_what_the_run_decides(tmp_path, digits, capsys, extra, problem):
    run = tmp_path / "run"
    fake_run(run, digits)
    assert key_report.main(["compare", "--run", str(run), *extra, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert problem in error and "\n" not in error
    assert not (tmp_path / "out").exists()
