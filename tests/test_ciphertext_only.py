"""The ciphertext-only attack and the image-specific scores every reconstructing attack reports."""

import json

import numpy as np
import pytest
import torch

from clients.keys import HolderKey
from server.attacks.ciphertext_only import attack
from server.attacks.ciphertext_only.__main__ import main as ciphertext_only_main
from server.attacks.common import image_specific_quality
from simulation.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    dataset = load_dataset("digits")
    return dataset, torch.from_numpy(np.concatenate([dataset.train.images, dataset.test.images]))


def run_attack(digits, family, holder=600, public=600):
    dataset, images = digits
    key = HolderKey.generate(dataset.image_shape, family=family, seed=3)
    return attack(key, images[:holder], images[-public:], mean=dataset.mean, std=dataset.std, attacked=48)["result"]


def test_a_repeated_key_falls_to_its_block_statistics_and_beats_the_identity_guess(digits):
    result = run_attack(digits, "repeated")
    identity = result["stages"]["identity_guess"]
    assert result["stage"] == "refined"
    assert result["residual_correlation"] > 0.9, result
    assert result["reidentification"] > 0.9
    assert result["residual_correlation"] > identity["residual_correlation"] + 0.5
    assert result["ssim"] > result["null_ssim"] + 0.3  # more than the digits' mean image gives


def test_the_refinement_improves_on_the_second_order_estimate(digits):
    result = run_attack(digits, "repeated")
    assert result["stages"]["refined"]["psnr_db"] > result["stages"]["second_order"]["psnr_db"] + 3


def test_a_dense_key_reports_failure_when_the_statistics_do_not_determine_it(digits):
    result = run_attack(digits, "dense")
    assert abs(result["residual_correlation"]) < 0.2, result
    assert result["reidentification"] < 0.15  # chance is 1/48
    assert result["ssim"] < result["null_ssim"]  # the mean digit is a better guess than the reconstruction


def test_a_blocks_key_gives_away_part_of_its_x_rays(shared_data):
    """One block per row position: the statistics determine each block only up to what the other positions share, so
    the attack recovers part of each image, not all of it (docs/privacy.md: 0.26 with 1000 images of each)."""
    dataset = load_dataset(f"npz:{shared_data / 'pneumoniamnist.npz'}")
    images = torch.from_numpy(np.concatenate([dataset.train.images, dataset.test.images]))
    key = HolderKey.generate(dataset.image_shape, family="blocks", seed=3)
    result = attack(key, images[:500], images[-500:], mean=dataset.mean, std=dataset.std, attacked=48)["result"]
    assert 0.2 < result["residual_correlation"] < 0.8, result
    assert result["reidentification"] > 5 * result["chance"]


def test_image_specific_quality_scores_truth_and_null_guess_as_they_are():
    generator = torch.Generator().manual_seed(0)
    mean_image = torch.rand(1, 8, 8, generator=generator)
    truth = (mean_image + 0.2 * torch.randn(10, 1, 8, 8, generator=generator)).clamp(0, 1)
    exact = image_specific_quality(truth, truth, mean_image)
    assert exact["residual_correlation"] == pytest.approx(1.0)
    assert exact["reidentification"] == 1.0 and exact["chance"] == pytest.approx(0.1)
    null = image_specific_quality(truth, mean_image.expand_as(truth), mean_image)
    assert null["reidentification"] == 0.0  # every reconstruction ties: nobody is re-identified
    assert null["residual_correlation"] == 0.0
    assert null["ssim"] == pytest.approx(null["null_ssim"]) and null["correlation"] == pytest.approx(null["null_correlation"])
    shuffled = image_specific_quality(truth, truth.roll(1, dims=0), mean_image)
    assert shuffled["reidentification"] == 0.0 and shuffled["residual_correlation"] < 0.5


def test_the_command_writes_the_figures_the_issue_names(tmp_path, capsys):
    out = tmp_path / "co"
    code = ciphertext_only_main(["--dataset", "digits", "--key-family", "repeated", "--holder-images", "200,400",
                                 "--public-images", "400", "--attacked", "32", "--holder-seed", "1", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "ciphertext_only.json").read_text())
    for name in ("correlation", "ssim", "psnr", "null_ssim", "null_correlation", "residual_correlation", "reidentification", "chance"):
        assert isinstance(result[name], float), name
    assert [(p["holder_images"], p["public_images"]) for p in result["curve"]] == [(200, 400), (400, 400)]
    assert result["residual_correlation"] > 0.8
    assert (out / "ciphertext_only.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "resid corr" in printed and str(out / "ciphertext_only.json") in printed


def test_the_command_refuses_overlapping_holder_and_public_images(tmp_path, capsys):
    code = ciphertext_only_main(["--dataset", "digits", "--holder-images", "1500", "--public-images", "1000",
                                 "--out", str(tmp_path / "co")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "disjoint images" in error and "\n" not in error
