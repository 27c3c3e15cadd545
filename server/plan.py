"""The pre-run plan: everything about a run that can be checked before a run folder exists or a holder starts.

`plan_run` is the one place these checks live: the command-line launcher calls it before creating the run folder,
and the ServerApp builds its run from the same plan, so a bad setting gets the same one-line error either way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from clients.augconv import CONSTRUCTION_CHUNK_BYTES, augconv_bytes
from clients.holder import key_padding
from clients.keys import check_key_geometry
from clients.privacy import check_delta
from server.first_layer import initial_model, load_first_layer
from simulation.config import HOLDER_DP, UPDATE_DP_MODES, ExperimentConfig
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
    block_size: int  # q, resolved (the image width when the settings leave it out)

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
    # The checks HolderKey.generate makes in every holder, without drawing a key, and what the keys will cost.
    padding = key_padding(config.key_padding, model.first)
    check_memory(config, placement.dataset.image_shape, model, padding)
    block_size = check_key_geometry(placement.dataset.image_shape, config.key_family, config.block_size, padding)
    shared = shared_backbone_names(model, config)
    if config.dp == HOLDER_DP:
        check_delta(config.dp_delta, max(len(train) for train in placement.holder_train))
    make_strategy(config)
    return RunPlan(config, placement, model, shared, block_size)


# What building an AugConv holds on top of the finished layer: a float64 chunk of morphed unit images, its responses
# and their placed copies, each at most CONSTRUCTION_CHUNK_BYTES (measured: a blocks key on 1x128x128 images peaked
# 0.6 GiB above its 0.75 GiB AugConv; benchmarks.augconv reports the peak).
CONSTRUCTION_SCRATCH_BYTES = 3 * CONSTRUCTION_CHUNK_BYTES


def check_memory(config: ExperimentConfig, image_shape, model: SplitModel, padding: int,
                 memory_bytes: int | None = None) -> int:
    """Refuse, with the estimate and the fix, keys and AugConvs that would not fit in this machine's memory: one
    holder's (its key and inverse in float64, its AugConv in float32, and the scratch of building it), and all the
    holders the Ray workers here keep in memory at once (--holder-cache per worker), each worker building one. Returns
    one holder's estimate in bytes, without the scratch."""
    q = check_key_geometry(image_shape, config.key_family, config.block_size, padding)
    channels, height, width = image_shape
    domain = (channels, height + 2 * padding, width + 2 * padding)
    size = math.prod(domain)
    key_entries = {"dense": size * size, "blocks": size * q, "repeated": q * q}[config.key_family]
    per_holder = 2 * 8 * key_entries + augconv_bytes(model.first, domain, config.key_family, q, padding)
    memory = physical_memory() if memory_bytes is None else memory_bytes
    what = (f"a {config.key_family} key with q = {q} on {channels}x{height}x{width} images needs "
            f"{per_holder / 2**30:.2f} GiB per holder (key, inverse and AugConv; "
            f"{CONSTRUCTION_SCRATCH_BYTES / 2**30:.2f} GiB more while its AugConv is built)")
    if per_holder + CONSTRUCTION_SCRATCH_BYTES > memory / 2:
        raise UsageError(f"{what}, more than half of this machine's {memory / 2**30:.1f} GiB; use --key-family "
                         "blocks or repeated, a smaller --block-size, or a smaller --image-size")
    if not config.ray_address:
        workers = max(1, int((os.cpu_count() or 1) // config.cpus_per_holder))
        resident = min(config.holders, workers * config.holder_cache)
        building = min(config.holders, workers) * CONSTRUCTION_SCRATCH_BYTES
        if resident * per_holder + building > 0.8 * memory:
            fits = max(1, int((0.8 * memory - building) // per_holder) // workers)
            raise UsageError(f"{what}, and {workers} Ray workers keeping up to {config.holder_cache} holders each "
                             f"would hold {(resident * per_holder + building) / 2**30:.1f} GiB of this machine's "
                             f"{memory / 2**30:.1f} GiB; lower --holder-cache to {fits} or use a lighter key")
    return per_holder


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
    if config.dp in UPDATE_DP_MODES:
        strategy = with_differential_privacy(
            strategy, mode=config.dp, noise_multiplier=config.dp_noise, clipping_norm=config.dp_clip,
            num_sampled_holders=sampled_train_holders(strategy, config.holders),
        )
    return strategy
