"""Phase 0: the server forms the first convolution C (and the initial backbone) before any holder trains."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from simulation.config import ExperimentConfig
from simulation.data import augment, normalize
from simulation.errors import UsageError
from simulation.federation import Federation, derive_seed
from simulation.models import SplitModel, build_model
from simulation.training import pick_device, train_epochs


def initial_model(config: ExperimentConfig, federation: Federation) -> SplitModel:
    """The same random initial weights for MpLe and its baseline, drawn from the experiment seed."""
    dataset = federation.dataset
    torch.manual_seed(derive_seed(config.seed, "model"))
    return build_model(
        config.model,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        image_size=tuple(dataset.image_shape[1:]),
    )


def form_first_layer(config: ExperimentConfig, federation: Federation, progress=print) -> tuple[SplitModel, dict]:
    """Return the model whose `first` is the frozen C every holder builds its AugConv from, its `backbone` the
    initial global backbone, and a summary of how C was formed."""
    model = initial_model(config, federation)
    kind, _, path = config.first_layer.partition(":")
    summary: dict = {"mode": kind}
    if kind == "pretrain":
        summary.update(_pretrain(config, federation, model, progress))
    elif kind == "file":
        summary.update(_load(model, Path(path).expanduser()))
    model.first.requires_grad_(False)
    return model, summary


def _pretrain(config: ExperimentConfig, federation: Federation, model: SplitModel, progress) -> dict:
    """Train the plain model on the public split, which no holder owns."""
    dataset, public = federation.dataset, federation.public
    device = pick_device(config.gpus_per_holder)
    model.to(device)
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "pretrain"))

    def batches():
        order = public[torch.randperm(len(public), generator=generator).numpy()]
        for start in range(0, len(order), config.batch_size):
            chosen = order[start : start + config.batch_size]
            raw = torch.from_numpy(dataset.train.images[chosen])
            if config.use_augmentation:
                raw = augment(raw, generator)
            yield (
                normalize(raw, dataset.mean, dataset.std).to(device),
                torch.from_numpy(dataset.train.labels[chosen]).to(device),
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


def _load(model: SplitModel, path: Path) -> dict:
    """A checkpoint with `first` (the conv's state dict) and optionally `backbone`, e.g. a run's first_layer.pt."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.first.load_state_dict(checkpoint["first"])
        if "backbone" in checkpoint:
            model.backbone.load_state_dict(checkpoint["backbone"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"first-layer file {path} does not fit this model ({first_line}); give a first_layer.pt from a run "
            "with the same --model and dataset"
        ) from None
    return {"file": str(path), "with_backbone": "backbone" in checkpoint}
