"""The pre-run plan: everything about a run that can be checked before a run folder exists or a holder starts.

`plan_run` is the one place these checks live: the command-line launcher calls it before creating the run folder,
and the ServerApp builds its run from the same plan, so a bad setting gets the same one-line error either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from clients.holder import key_padding
from clients.keys import check_key_geometry
from server.first_layer import initial_model, load_first_layer
from simulation.config import ExperimentConfig
from simulation.errors import UsageError
from simulation.models import SplitModel, order_sensitive_keys, under_prefix
from simulation.placement import DataPlacement, placement_for
from strategies.registry import build_strategy, sampled_train_holders, with_differential_privacy


@dataclass
class RunPlan:
    config: ExperimentConfig
    placement: DataPlacement
    model: SplitModel  # the initial model; phase 0 forms its first layer
    shared: list[str]  # the backbone entries that travel

    @property
    def initial_local(self) -> ArrayRecord:
        """Initial values of the backbone entries that stay with the holders."""
        state = self.model.backbone.state_dict()
        return ArrayRecord({name: value for name, value in state.items() if name not in self.shared})

    @property
    def initial_shared(self) -> ArrayRecord:
        state = self.model.backbone.state_dict()
        return ArrayRecord({name: state[name] for name in self.shared})


def plan_run(config: ExperimentConfig) -> RunPlan:
    """Check data, partition, model, first-layer file, key geometry, layers and strategy; return the plan."""
    if config.gpus_per_holder > 0 and not config.ray_address and not torch.cuda.is_available():
        raise UsageError(f"--gpus-per-holder {config.gpus_per_holder} asks for GPUs, but torch sees no CUDA "
                         "device here; drop the flag to run on the CPU, or join a cluster with --ray-address")
    placement = placement_for(config)
    model = initial_model(config, placement)
    kind, _, path = config.first_layer.partition(":")
    if kind == "file":
        load_first_layer(path, model)  # reads the file now, not inside the run
    # The checks HolderKey.generate makes in every holder, without drawing a key.
    check_key_geometry(placement.dataset.image_shape, config.key_family, config.block_size,
                       key_padding(config.key_padding, model.first))
    shared = shared_backbone_names(model, config)
    make_strategy(config)
    return RunPlan(config, placement, model, shared)


def shared_backbone_names(model: SplitModel, config: ExperimentConfig) -> list[str]:
    """The backbone entries that travel: floating-point, not listed as local, and (with per-holder channel orders)
    not indexed by the first layer's channels."""
    state = model.backbone.state_dict()
    missing = [prefix for prefix in config.local_layers if not any(under_prefix(name, prefix) for name in state)]
    if missing:
        raise UsageError(f"--local-layers names {missing}, which the {config.model} backbone does not have; "
                         f"its layers are {sorted({name.rsplit('.', 1)[0] for name in state})}")
    sensitive = set(order_sensitive_keys(model)) if config.shuffle == "holder" else set()
    names = [
        name for name, value in state.items()
        if value.is_floating_point() and name not in sensitive
        and not any(under_prefix(name, prefix) for prefix in config.local_layers)
    ]
    if not names:
        raise UsageError("no backbone layer is left to share; remove some --local-layers")
    return names


def make_strategy(config: ExperimentConfig):
    """The run's strategy with the run's sampling, wrapped for differential privacy when asked."""
    strategy = build_strategy(
        config.strategy,
        dict(config.strategy_args),
        num_holders=config.holders,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_holders=config.min_holders,
        min_evaluate_holders=config.min_holders,
        learning_rate=config.lr,
    )
    if config.dp:
        strategy = with_differential_privacy(
            strategy, mode=config.dp, noise_multiplier=config.dp_noise, clipping_norm=config.dp_clip,
            num_sampled_holders=sampled_train_holders(strategy, config.holders),
        )
    return strategy
