"""Cross-key accuracy: holder ``i``'s AugConv with the shared backbone on holder ``j``'s morphed test data.

The diagonal is each holder's own accuracy. Off the diagonal, holder ``j``'s data morphed with ``M_j``
go through ``M_i^-1``: if keys separate holders, those accuracies fall to about chance.

:func:`cross_key_matrix` takes a trained backbone (the lead's simulation calls it after a run).
The command (``python -m server.attacks.cross_key``, in ``__main__.py``) trains a small backbone itself,
quickly, on the holders' morphed training data through their own AugConvs (the first layer frozen, random
from the seed), then measures the matrix; with ``--run`` it measures a finished run's
(:func:`cross_key_for_run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.augconv import AugConv
from clients.holder import Holder, holder_home
from clients.keys import HolderKey
from clients.morphing import morph
from clients.secrets import SECRETS_FILE, HolderSecrets
from server.attacks.common import write_json
from server.checkpoint import Checkpoints
from server.first_layer import initial_model, load_first_layer
from simulation.config import ExperimentConfig
from simulation.data import ImageDataset, normalize, partition
from simulation.errors import UsageError
from simulation.models import build_model
from simulation.placement import placement_for
from simulation.protocol import HolderSettings
from simulation.run_folder import CHECKPOINT_FILE, FIRST_LAYER_FILE, RUN_MARKER


def cross_key_matrix(
    backbone: nn.Module,
    augconvs: Sequence[nn.Module],
    test_sets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """``accuracy[i, j]``: AugConv ``i`` + ``backbone`` on holder ``j``'s morphed test images.

    ``test_sets[j]`` is ``(morphed float images, labels)``. A pair whose shapes do not fit (keys over
    different domains) gets NaN. The backbone is evaluated in eval mode and left in the mode it had.
    """
    was_training = backbone.training
    backbone.eval()
    accuracy = np.full((len(augconvs), len(test_sets)), np.nan)
    device = next(backbone.parameters()).device
    with torch.no_grad():
        for i, augconv in enumerate(augconvs):
            for j, (morphed, labels) in enumerate(test_sets):
                if tuple(morphed.shape[1:]) != tuple(augconv.domain_shape) or len(labels) == 0:
                    continue
                correct = 0
                for start in range(0, len(labels), batch_size):
                    batch = morphed[start : start + batch_size].to(device)
                    logits = backbone(augconv(batch))
                    correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
                accuracy[i, j] = correct / len(labels)
    backbone.train(was_training)
    return accuracy


def write_cross_key(accuracy: np.ndarray, out_dir: str | Path, *, chance: float | None = None, context: dict | None = None) -> tuple[Path, Path]:
    """``cross_key.json`` and a heat map ``cross_key.png`` in ``out_dir``.

    ``chance`` is the accuracy of a constant guess to draw the matrix against (the command uses the
    share of the test set's most common class).
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    off_diagonal = accuracy[~np.eye(*accuracy.shape, dtype=bool)] if accuracy.shape[0] > 1 else np.array([np.nan])
    summary = {
        "accuracy": accuracy,
        "own_key_mean": float(np.nanmean(np.diag(accuracy))),
        "other_key_mean": float(np.nanmean(off_diagonal)),
        "other_key_max": float(np.nanmax(off_diagonal)),
        "chance": chance,
    }
    json_path = write_json(out_dir / "cross_key.json", {"context": context or {}, **summary})
    size = accuracy.shape[0]
    figure = Figure(figsize=(3.4 + 0.45 * size, 1.8 + 0.4 * size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(accuracy, vmin=0, vmax=1, cmap="viridis")
    if size <= 20:
        axes.set_xticks(range(accuracy.shape[1]))
        axes.set_yticks(range(size))
        for i in range(size):
            for j in range(accuracy.shape[1]):
                axes.text(j, i, f"{accuracy[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if accuracy[i, j] < 0.6 else "black")
    axes.set_xlabel("holder j: morphed test data")
    axes.set_ylabel("holder i: AugConv")
    note = "" if chance is None else f", chance {chance:.2f}"
    axes.set_title(f"cross-key accuracy (own {summary['own_key_mean']:.2f}, other {summary['other_key_mean']:.2f}{note})", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    png_path = out_dir / "cross_key.png"
    figure.savefig(png_path, dpi=110)
    return json_path, png_path


def train_demo_backbone(
    model_name: str,
    dataset: ImageDataset,
    first_conv: nn.Conv2d,
    keys: Sequence[HolderKey],
    orders: Sequence[Sequence[int]] | None,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, list[AugConv], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Train a backbone on all holders' morphed training images, each through its own AugConv.

    The training set is split iid among the holders; so is the test set. The first layer is frozen,
    so the AugConv outputs are computed once. Returns the backbone, the AugConvs and each holder's
    morphed test set. A demonstration, not the federated simulation.
    """
    torch.manual_seed(seed)
    holders = len(keys)
    orders = [None] * holders if orders is None else orders
    model = build_model(model_name, in_channels=dataset.channels, num_classes=dataset.num_classes, image_size=dataset.image_shape[1])
    backbone = model.backbone
    augconvs = [AugConv.from_conv(first_conv, key, order) for key, order in zip(keys, orders)]
    train_parts = partition(dataset.train.labels, holders, "iid", seed=seed)
    test_parts = partition(dataset.test.labels, holders, "iid", seed=seed + 1)
    features, labels, test_sets = [], [], []
    with torch.no_grad():
        for key, augconv, train_part, test_part in zip(keys, augconvs, train_parts, test_parts):
            images = normalize(torch.from_numpy(dataset.train.images[train_part]), dataset.mean, dataset.std)
            features.append(augconv(morph(images, key)))
            labels.append(torch.from_numpy(dataset.train.labels[train_part]))
            test_images = normalize(torch.from_numpy(dataset.test.images[test_part]), dataset.mean, dataset.std)
            test_sets.append((morph(test_images, key), torch.from_numpy(dataset.test.labels[test_part])))
    features, labels = torch.cat(features), torch.cat(labels)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    backbone.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(backbone(features[batch].clone()), labels[batch])
            loss.backward()
            optimizer.step()
    return backbone, augconvs, test_sets


def cross_key_for_run(run_dir: str | Path, *, max_holders: int = 10) -> tuple[np.ndarray, dict]:
    """The matrix for a finished `simulation.run`: its final global backbone (mple/checkpoint.pt), and the first
    `max_holders` holders' AugConvs and test splits from their own folders."""
    run_dir = Path(run_dir)
    checkpoints = Checkpoints(run_dir / "mple")
    if not (run_dir / RUN_MARKER).is_file() or not checkpoints.path.is_file():
        raise UsageError(f"{run_dir} is not a finished run folder ({RUN_MARKER} and mple/{CHECKPOINT_FILE} expected)")
    config = ExperimentConfig.from_json((run_dir / RUN_MARKER).read_text())
    if config.shuffle == "holder" or config.local_layers:
        raise UsageError("cross-key needs one global backbone; this run keeps layers local per holder "
                         "(--shuffle holder or --local-layers), so each holder's model differs")
    placement = placement_for(config)
    model = initial_model(config, placement)
    load_first_layer(run_dir / FIRST_LAYER_FILE, model)
    model.backbone.load_state_dict(checkpoints.read()["arrays"], strict=False)
    settings = HolderSettings.from_config(config, "mple")
    homes = [holder_home(run_dir, h) for h in range(min(config.holders, max_holders))]
    holders = [Holder(h, settings, home, HolderSecrets.load(home / SECRETS_FILE), model.first, torch.device("cpu"))
               for h, home in enumerate(homes)]
    test_sets = []
    for holder in holders:
        batches = list(holder.batches("test")())
        test_sets.append((torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])))
    labels = placement.dataset.test.labels
    context = {"run": str(run_dir), "holders": len(holders), "dataset": config.dataset, "model": config.model,
               "key_family": config.key_family}
    context["majority_class_rate"] = float(np.bincount(labels).max() / len(labels))
    return cross_key_matrix(model.backbone, [holder.first for holder in holders], test_sets), context
