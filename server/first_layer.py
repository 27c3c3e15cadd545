"""Phase 0: the server forms the first convolution C (and the initial backbone) before any holder trains."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from simulation.config import HOLDER_DP, ExperimentConfig
from simulation.data import image_batches
from simulation.errors import UsageError
from simulation.models import SplitModel, build_model
from simulation.placement import DataPlacement
from simulation.seeds import derive_seed
from simulation.training import pick_device, train_epochs


def initial_model(config: ExperimentConfig, placement: DataPlacement) -> SplitModel:
    """The same random initial weights for MpLe and its baseline, drawn from the experiment seed; under --dp holder
    with GroupNorms for BatchNorms, as the holders build it (Opacus' per-sample gradients need that)."""
    dataset = placement.dataset
    torch.manual_seed(derive_seed(config.seed, "model"))
    return build_model(
        config.model,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        image_size=tuple(dataset.image_shape[1:]),
        dp_sgd=config.dp == HOLDER_DP,
    )


def form_first_layer(config: ExperimentConfig, placement: DataPlacement, model: SplitModel, progress=print) -> dict:
    """Make `model.first` the frozen C every holder builds its AugConv from and `model.backbone` the initial global
    backbone (`model` is the initial model); return a summary of how C was formed."""
    kind, _, path = config.first_layer.partition(":")
    summary: dict = {"mode": kind}
    if kind == "pretrain":
        summary.update(_pretrain(config, placement, model, progress))
    elif kind == "file":
        summary.update(load_first_layer(Path(path).expanduser(), model))
    model.first.requires_grad_(False)
    return summary


def _pretrain(config: ExperimentConfig, placement: DataPlacement, model: SplitModel, progress) -> dict:
    """Train the plain model on the public split, which no holder owns."""
    dataset, public = placement.dataset, placement.public
    device = pick_device(config.gpus_per_holder, required=False)
    model.to(device)
    batches = image_batches(
        dataset.train, public, batch_size=config.batch_size, mean=dataset.mean, std=dataset.std,
        generator=torch.Generator().manual_seed(derive_seed(config.seed, "pretrain")),
        augmentation=config.use_augmentation, device=device,
    )
    torch.manual_seed(derive_seed(config.seed, "pretrain-dropout"))
    loss, accuracy = float("nan"), float("nan")
    for epoch in range(config.pretrain_epochs):
        loss, accuracy, _ = train_epochs(
            model.first, model.backbone, batches, epochs=1, lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        progress(f"phase 0: pretraining the first layer on {len(public)} public images, epoch {epoch + 1}/"
                 f"{config.pretrain_epochs}: loss {loss:.4f}, accuracy {accuracy:.3f}")
    model.cpu()
    return {"public_images": int(len(public)), "epochs": config.pretrain_epochs, "loss": loss, "accuracy": accuracy}


def load_first_layer(path: Path, model: SplitModel, *, with_backbone: bool = True) -> dict:
    """Load a checkpoint with `first` (the conv's state dict) and optionally `backbone`, e.g. a run's
    first_layer.pt, into `model`; tensors only (never unpickles objects)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"first-layer file {path} does not exist; give the path of a run's first_layer.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("first"), dict):
            raise KeyError("no 'first' entry (the convolution's state dict)")
        model.first.load_state_dict(checkpoint["first"])
        if with_backbone and "backbone" in checkpoint:
            model.backbone.load_state_dict(checkpoint["backbone"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"first-layer file {path} does not fit this model ({first_line}); give a first_layer.pt from a run "
            "with the same --model and dataset"
        ) from None
    return {"file": str(path), "with_backbone": with_backbone and "backbone" in checkpoint}
