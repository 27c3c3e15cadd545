"""Gradient inversion by the curious server, and what the holder's round-1 reply tells it about the channel order."""

import json

import numpy as np
import pytest
import torch

from clients.holder import holder_home
from clients.secrets import SECRETS_FILE, HolderSecrets, channel_order, draw_key
from server.attacks.common import public_mean_image, to_pixels, with_public_brightness
from server.attacks.gradient_inversion import (
    LocalTraining,
    attacker_model,
    holder_batch_order,
    holder_round,
    invert,
    order_from_alignment,
    score,
    server_view,
    simulate_update,
)
from server.attacks.gradient_inversion.__main__ import main as gradient_inversion_main
from server.first_layer import initial_model
from server.plan import shared_backbone_names
from simulation.config import ExperimentConfig
from simulation.data import load_dataset, normalize
from simulation.models import build_model
from simulation.placement import placement_for
from simulation.protocol import ACTION, ARRAYS, CONFIG

from .inprocess import run_in_process

TRAINING = LocalTraining(batch_size=1, steps=1, lr=0.05, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def pneumonia16(shared_data):
    path = shared_data / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent from the shared data folder")
    return load_dataset(f"npz:{path}", image_size=16)


def model_for(dataset, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=dataset.image_shape[0], num_classes=dataset.num_classes,
                       image_size=dataset.image_shape[1])


def holder_data(dataset, count, start=0):
    images = normalize(torch.from_numpy(dataset.train.images[start:start + count]), dataset.mean, dataset.std)
    return images, torch.as_tensor(dataset.train.labels[start:start + count], dtype=torch.long).reshape(-1)


def orders(count, channels=32):
    return [channel_order(HolderSecrets.from_holder_seed(7, holder), "holder", channels) for holder in range(count)]


def shared_names(model, shuffle, local_layers=()):
    return shared_backbone_names(model, ExperimentConfig(shuffle=shuffle, local_layers=list(local_layers)))


def inverted(dataset, model, sent, aligned, reply, labels, *, shuffle, iterations=600, **view):
    public = normalize(torch.from_numpy(dataset.test.images[-300:]), dataset.mean, dataset.std)
    view, _ = server_view(model, sent, aligned, reply, shuffle=shuffle, **view)
    inversion = invert(model, view, labels, TRAINING, image_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
                       restarts=1, iterations=iterations, seed=0)
    public_mean = public_mean_image(public, dataset.mean, dataset.std)
    return inversion, to_pixels(with_public_brightness(inversion.reconstruction, public), dataset.mean, dataset.std), public_mean


def test_one_image_of_the_plain_baseline_is_recognisable_from_its_single_step_update(pneumonia16):
    model = model_for(pneumonia16)
    images, labels = holder_data(pneumonia16, 1)
    sent, aligned, reply = holder_round(model, images, labels, TRAINING, key=None, order=range(32), shuffle="none",
                                        shared=shared_names(model, "none"), seed=0)
    _, reconstruction, public_mean = inverted(pneumonia16, model, sent, aligned, reply, labels, shuffle="none")
    figures = score(to_pixels(images, pneumonia16.mean, pneumonia16.std), reconstruction, public_mean)
    assert figures["residual_correlation"] > 0.6, figures  # what is specific to this image, beyond the mean image
    assert figures["correlation"] > figures["null_correlation"]


def test_noise_of_one_holders_aggregate_leaves_the_attack_nothing_to_find(pneumonia16):
    model = model_for(pneumonia16)
    images, labels = holder_data(pneumonia16, 1)
    sent, aligned, reply = holder_round(model, images, labels, TRAINING, key=None, order=range(32), shuffle="none",
                                        shared=shared_names(model, "none"), seed=0)
    _, reconstruction, public_mean = inverted(pneumonia16, model, sent, aligned, reply, labels, shuffle="none",
                                              clip=1.0, noise=1.0)
    figures = score(to_pixels(images, pneumonia16.mean, pneumonia16.std), reconstruction, public_mean)
    assert figures["residual_correlation"] < 0.4, figures
    assert figures["correlation"] < figures["null_correlation"]


def test_the_align_reply_gives_the_server_the_federation_order_exactly(pneumonia16):
    model = model_for(pneumonia16)
    images, labels = holder_data(pneumonia16, 2)
    order = orders(1)[0]
    sent, aligned, reply = holder_round(model, images, labels, TRAINING, key=None, order=order, shuffle="federation",
                                        shared=shared_names(model, "federation"), seed=0)
    assert torch.equal(order_from_alignment(model, aligned), torch.as_tensor(order))
    assert not torch.equal(torch.as_tensor(order), torch.arange(32))


def test_the_clientapps_own_align_reply_gives_the_server_the_federation_order_exactly(tmp_path):
    """The same through the real ServerApp and ClientApp: what the server sends for alignment and gets back."""
    _, grid, run = run_in_process(tmp_path, 2, rounds=1, shuffle="federation")
    ((message, reply),) = [(m, r) for m, r in grid.log if str(m.metadata.message_type).startswith("query")
                           and m.content[CONFIG][ACTION] == "align"]
    config = run.settings.config
    model = initial_model(config, placement_for(config))
    state = model.backbone.state_dict()
    state.update(message.content[ARRAYS].to_torch_state_dict())  # the server's own backbone, in the plain order
    model.backbone.load_state_dict(state)
    secrets = HolderSecrets.load(holder_home(run.settings.run_dir, 0) / SECRETS_FILE)
    truth = channel_order(secrets, "federation", model.first.out_channels)
    assert torch.equal(order_from_alignment(model, reply.content[ARRAYS].to_torch_state_dict()), truth)
    assert not torch.equal(truth, torch.arange(len(truth)))


def test_mple_replies_are_the_baselines_so_morphing_adds_nothing_against_gradient_inversion(pneumonia16):
    model = model_for(pneumonia16)
    images, labels = holder_data(pneumonia16, 4)
    key = draw_key(HolderSecrets.from_holder_seed(7, 0), pneumonia16.image_shape, family="repeated", block_size=None,
                   entries="uniform", padding=0)
    order = orders(1)[0]
    training = LocalTraining(batch_size=2, steps=2, lr=0.05, momentum=0.9, weight_decay=5e-4)
    shared = shared_names(model, "federation")
    _, _, mple = holder_round(model, images, labels, training, key=key, order=order, shuffle="federation", shared=shared, seed=3)
    _, _, plain = holder_round(model, images, labels, training, key=None, order=order, shuffle="federation", shared=shared, seed=3)
    worst = max(float((mple[name] - plain[name]).abs().max() / plain[name].abs().max().clamp_min(1e-12)) for name in shared)
    assert worst < 1e-3  # float32 AugConv against the plain layer, through two SGD steps


def test_a_holder_order_reply_in_round_one_carries_nothing_about_that_order(pneumonia16):
    model = model_for(pneumonia16)
    images, labels = holder_data(pneumonia16, 2)
    shared = shared_names(model, "holder")
    first, second = orders(2)
    _, _, reply_first = holder_round(model, images, labels, TRAINING, key=None, order=first, shuffle="holder", shared=shared, seed=0)
    _, _, reply_second = holder_round(model, images, labels, TRAINING, key=None, order=second, shuffle="holder", shared=shared, seed=0)
    assert set(reply_first) == set(shared) and not any(name.startswith("features.1.") for name in shared)
    for name in shared:
        torch.testing.assert_close(reply_first[name], reply_second[name], rtol=1e-4, atol=1e-6)


def test_the_command_reports_both_views_under_dp_and_the_order_it_read(tmp_path, shared_data, capsys):
    out = tmp_path / "gi"
    code = gradient_inversion_main([
        "--dataset", f"npz:{shared_data / 'pneumoniamnist.npz'}", "--image-size", "16", "--variant", "mple",
        "--shuffle", "federation", "--holder-seed", "1", "--batch-size", "2", "--iterations", "5", "--restarts", "1",
        "--dp", "client", "--dp-noise", "0.5", "--dp-clip", "1", "--public-images", "50", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "gradient_inversion.json").read_text())
    assert set(result["views"]) == {"server", "released"}
    assert result["views"]["server"]["order_from_align_reply_exact"] is True
    assert result["views"]["released"]["noise"] == 0.5 and result["views"]["server"]["noise"] == 0.0
    for name in ("ssim", "psnr", "null_ssim", "null_correlation", "residual_correlation", "reidentification", "chance"):
        assert isinstance(result[name], float), name
    assert result["chance"] == 0.5
    assert str(out / "gradient_inversion.json") in capsys.readouterr().out


def test_the_simulated_local_steps_reproduce_the_holders_update_from_its_true_images(pneumonia16):
    # the attack's model of the holder: unrolled SGD with momentum and weight decay, labels per step as the holder
    # took them; only dropout differs (the holder's masks are secret), so the match is close, not exact
    model = model_for(pneumonia16)
    labels = torch.as_tensor(pneumonia16.train.labels.reshape(-1), dtype=torch.long)
    pick = torch.cat([torch.nonzero(labels == c).reshape(-1)[:3] for c in (0, 1)])  # both classes, so steps differ
    images = normalize(torch.from_numpy(pneumonia16.train.images[pick.numpy()]), pneumonia16.mean, pneumonia16.std)
    labels = labels[pick]
    training = LocalTraining(batch_size=2, steps=3, lr=0.05, momentum=0.9, weight_decay=5e-4)
    sent, aligned, reply = holder_round(model, images, labels, training, key=None, order=range(32), shuffle="none",
                                        shared=shared_names(model, "none"), seed=4)
    view, _ = server_view(model, sent, aligned, reply, shuffle="none")
    attacker = attacker_model(model)
    observed = torch.cat([view.update[name].reshape(-1).float() for name in view.update])

    def match(order):
        simulated = simulate_update(attacker, view, images[order], labels[order], training)
        flat = torch.cat([simulated[name].reshape(-1).detach() for name in view.update])
        return float(torch.nn.functional.cosine_similarity(flat, observed, dim=0))

    holders_steps = holder_batch_order(len(images), 4)
    right, wrong = match(holders_steps), match(torch.arange(len(images)))
    assert right > 0.8  # 0.84 measured: dropout is the only difference
    assert right > wrong + 0.3  # labels in another order than the holder's steps: 0.28 measured
