"""The augmented convolution ``C^ac = M^-1 C Pi`` (DESIGN.md section 1).

``AugConv.from_conv(conv, key, order)(morph(x, key)) == conv(x)[:, order]``.

How it is stored. ``C^ac`` maps the morphed image to the output feature maps. Output row ``y``
only depends on the ``p`` input rows under the kernel, so it only depends on the key's blocks that
touch those rows. AugConv groups the output rows into groups of ``g`` rows; for each group it
gathers the morphed values of the blocks that the group's receptive field touches (a "patch")
and multiplies the patch by that group's fused weight, a slice of ``C^ac``:

* ``dense`` keys: one group, one block; the weight is the dense ``N x beta*n^2`` matrix.
* ``blocks`` keys: one group per output row, each with its own weight: a locally connected
  layer that holds only the non-zero part of ``C^ac``.
* ``repeated`` keys whose blocks tile the image planes: every group sees the same block
  pattern with the same ``M'``, so all groups share one weight, a 1-D convolution over rows
  (with ``q`` equal to the image width, ``alpha*q*p`` inputs by ``beta*n`` outputs).

Construction never forms ``C`` or ``M^-1 C`` densely: row ``u`` of ``C^ac`` is the convolution
of row ``u`` of ``M^-1`` laid out as an image, so each block's rows of ``C^ac`` are computed by
convolving that block's rows of ``M^-1`` over a window just large enough to hold the block.
The fused weights are computed in float64 and stored in the requested dtype; ``M^-1`` itself
is never stored.
"""

from __future__ import annotations

import hmac
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.keys import HolderKey, MorphingKeyError, file_tag
from simulation.files import atomic_torch_save

# Upper bound on the float64 scratch memory used per step of the construction.
CONSTRUCTION_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Geometry:
    channels: int
    domain: tuple[int, int]  # (rows, columns) of the morphing domain
    kernel: tuple[int, int]
    offset: tuple[int, int]  # zero padding the convolution adds around the domain
    out_channels: int

    @property
    def output(self) -> tuple[int, int]:
        return tuple(d + 2 * o - k + 1 for d, o, k in zip(self.domain, self.offset, self.kernel))

    @property
    def plane(self) -> int:
        return self.domain[0] * self.domain[1]


@dataclass(frozen=True)
class _Layout:
    group_rows: int
    block_index: torch.Tensor  # (groups, slots) indices of blocks; num_blocks marks an empty slot
    # Blocks whose rows of C^ac are computed: channel, row and column of each of their q entries.
    channel: np.ndarray  # (unique, q)
    row: np.ndarray
    column: np.ndarray
    key_block: np.ndarray  # (unique,) which stored block of the key each one uses
    # Where each computed block goes in the weight: (group, slot, unique block).
    placements: np.ndarray  # (count, 3)
    weight_groups: int  # 1 when the weight is shared by all groups


class AugConv(nn.Module):
    """A frozen first layer that reads morphed images: ``AugConv(morph(x)) == conv(x)[:, order]``.

    It has no trainable parameters; its fused weight is a buffer. Build it with :meth:`from_conv`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        block_index: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        domain_shape: tuple[int, int, int],
        block_size: int,
        out_channels: int,
        group_rows: int,
        output_size: tuple[int, int],
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("block_index", block_index)
        self.register_buffer("bias", bias)
        self.domain_shape = tuple(domain_shape)
        self.block_size = block_size
        self.out_channels = out_channels
        self.group_rows = group_rows
        self.output_size = tuple(output_size)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        key: HolderKey,
        order=None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "AugConv":
        """Fuse ``key`` and an optional output channel ``order`` into ``conv``.

        ``conv`` must have stride 1, dilation 1 and one group. For keys over the padded image
        (``key.padding > 0``) its padding must equal the key's; for keys over the image as is,
        any zero padding works. The weight is built in float64 and stored as ``dtype``.
        """
        geometry = _geometry(conv, key)
        weight = conv.weight.detach().to(device="cpu", dtype=torch.float64)
        bias = None if conv.bias is None else conv.bias.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise MorphingKeyError("convolution weights contain NaN or infinite values; AugConv needs a finite layer")
        permutation = _channel_order(order, geometry.out_channels)
        weight = weight[permutation]
        bias = None if bias is None else bias[permutation]

        layout = _layout(key, geometry)
        fused = _fused_weight(key, geometry, layout, weight, dtype)
        device = conv.weight.device if device is None else torch.device(device)
        return cls(
            fused.to(device),
            layout.block_index.to(device),
            None if bias is None else bias.to(device=device, dtype=dtype),
            domain_shape=key.domain_shape,
            block_size=key.block_size,
            out_channels=geometry.out_channels,
            group_rows=layout.group_rows,
            output_size=geometry.output,
        )

    # ---------------------------------------------------------------- files
    def save(self, path, *, auth_key: bytes) -> Path:
        """Write the layer as tensors and plain values (never a pickled object), owner-only, with an authentication
        tag keyed by the holder's secret."""
        tensors = {name: buffer.detach().cpu() for name, buffer in self.named_buffers() if buffer is not None}
        meta = json.dumps(self._meta(), sort_keys=True)
        tag = file_tag(auth_key, meta.encode(), *(_tensor_bytes(tensors[name]) for name in sorted(tensors)))
        return atomic_torch_save({"meta": meta, "tensors": tensors, "tag": tag.hex()}, path, private=True)

    @classmethod
    def load(cls, path, *, auth_key: bytes, device: torch.device | str = "cpu") -> "AugConv | None":
        """The layer saved by :meth:`save`, or None where the file is unreadable, not one, or fails its tag (the
        holder then builds it again from its key). Reads tensors only (``weights_only``)."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            tensors, meta = saved["tensors"], saved["meta"]
            expected = file_tag(auth_key, meta.encode(), *(_tensor_bytes(tensors[name]) for name in sorted(tensors)))
            if not hmac.compare_digest(bytes.fromhex(saved["tag"]), expected):
                return None
            values = json.loads(meta)
            module = cls(tensors["weight"], tensors["block_index"], tensors.get("bias"),
                         domain_shape=tuple(values["domain_shape"]), block_size=values["block_size"],
                         out_channels=values["out_channels"], group_rows=values["group_rows"],
                         output_size=tuple(values["output_size"]))
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError):
            return None
        return module.to(device)

    def _meta(self) -> dict:
        return {"domain_shape": list(self.domain_shape), "block_size": self.block_size,
                "out_channels": self.out_channels, "group_rows": self.group_rows,
                "output_size": list(self.output_size)}

    @property
    def shared(self) -> bool:
        """Whether all row groups share one weight (for ``repeated`` keys, a 1-D convolution over rows)."""
        return self.weight.dim() == 2

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the layer's buffers."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def forward(self, morphed: torch.Tensor) -> torch.Tensor:
        if morphed.dim() != 4 or tuple(morphed.shape[1:]) != self.domain_shape:
            raise MorphingKeyError(
                f"AugConv expects morphed images of shape (B, {', '.join(map(str, self.domain_shape))}), "
                f"got {tuple(morphed.shape)}; morph the images with this holder's key"
            )
        batch = morphed.shape[0]
        groups, slots = self.block_index.shape
        rows = morphed.reshape(batch, -1, self.block_size)
        rows = F.pad(rows, (0, 0, 0, 1))  # an all-zero block for the empty slots
        patches = rows[:, self.block_index].reshape(batch, groups, slots * self.block_size)
        if self.shared:
            out = patches @ self.weight
        else:
            out = torch.bmm(patches.transpose(0, 1), self.weight).transpose(0, 1)
        height, width = self.output_size
        out = out.reshape(batch, groups, self.out_channels, self.group_rows, width)
        out = out.permute(0, 2, 1, 3, 4).reshape(batch, self.out_channels, groups * self.group_rows, width)
        if groups * self.group_rows != height:
            out = out[:, :, :height]
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        groups = self.block_index.shape[0]
        weights = "one shared weight" if self.shared else "a weight per group"
        return (
            f"domain={self.domain_shape}, out_channels={self.out_channels}, output={self.output_size}, q={self.block_size}, "
            f"{groups} groups of {self.group_rows} rows with {weights}, {self.memory_bytes / 2**20:.2f} MiB"
        )


@dataclass(frozen=True)
class _KeyShape:
    """What the layout of C^ac depends on: a key's family and geometry, never its values."""

    family: str
    block_size: int
    domain_shape: tuple[int, int, int]
    padding: int

    @property
    def size(self) -> int:
        return math.prod(self.domain_shape)

    @property
    def num_blocks(self) -> int:
        return self.size // self.block_size

    def block_for(self, index: int) -> int:
        return index if self.family == "blocks" else 0


def augconv_bytes(conv: nn.Conv2d, domain_shape, family: str, block_size: int, padding: int) -> int:
    """The float32 weight AugConv would hold for a key of this family and geometry, without drawing a key (a dense
    key's is N x beta*n^2; the others' come from the block layout)."""
    shape = _KeyShape(family, block_size, tuple(domain_shape), padding)
    geometry = _geometry(conv, shape)
    if family == "dense":
        return shape.size * geometry.out_channels * math.prod(geometry.output) * 4
    layout = _layout(shape, geometry)
    slots = layout.block_index.shape[1]
    return layout.weight_groups * slots * block_size * geometry.out_channels * layout.group_rows * geometry.output[1] * 4


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return repr((str(tensor.dtype), tuple(tensor.shape))).encode() + tensor.contiguous().numpy().tobytes()


def conv_matrix(weight: torch.Tensor, input_shape: tuple[int, int, int], padding=(0, 0)) -> torch.Tensor:
    """The explicit convolution matrix ``C`` of the paper's Algorithm 1.

    ``D.reshape(-1) @ C == conv2d(D, weight, padding=padding).reshape(-1)`` for stride 1. ``C`` is
    dense, ``alpha*H*W x beta*n^2``: meant for small images, checks and attacks.
    """
    out_channels, channels, kh, kw = weight.shape
    _, height, width = input_shape
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    out_h, out_w = height + 2 * pad_h - kh + 1, width + 2 * pad_w - kw + 1
    j, i, a, b, y, x = torch.meshgrid(
        *(torch.arange(n) for n in (out_channels, channels, kh, kw, out_h, out_w)), indexing="ij"
    )
    row, column = y + a - pad_h, x + b - pad_w
    inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
    matrix = torch.zeros(channels * height * width, out_channels * out_h * out_w, dtype=weight.dtype)
    matrix[
        (i * height * width + row * width + column)[inside],
        (j * out_h * out_w + y * out_w + x)[inside],
    ] = weight[j[inside], i[inside], a[inside], b[inside]]
    return matrix


# ---------------------------------------------------------------------------- construction
def _geometry(conv: nn.Module, key: HolderKey) -> _Geometry:
    if not isinstance(conv, nn.Conv2d):
        raise MorphingKeyError(f"AugConv is built from an nn.Conv2d, got {type(conv).__name__}")
    if tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1):
        raise MorphingKeyError(
            f"AugConv supports stride 1 and dilation 1 only, got stride {tuple(conv.stride)} and dilation "
            f"{tuple(conv.dilation)}; use a stride-1 first layer and downsample after it"
        )
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise MorphingKeyError(
            f"AugConv supports groups=1 and zero padding only, got groups={conv.groups}, padding_mode={conv.padding_mode!r}"
        )
    channels, rows, columns = key.domain_shape
    if conv.in_channels != channels:
        raise MorphingKeyError(
            f"the convolution reads {conv.in_channels} channels but the key is for {channels}-channel images; "
            "use a key made for these images"
        )
    kernel = tuple(conv.kernel_size)
    padding = _conv_padding(conv)
    if key.padding:
        if padding != (key.padding, key.padding):
            raise MorphingKeyError(
                f"the key morphs images zero-padded by {key.padding} but the convolution pads by {padding}; "
                "generate the key with the convolution's padding, or with padding=0"
            )
        offset = (0, 0)
    else:
        offset = padding
    geometry = _Geometry(channels, (rows, columns), kernel, offset, conv.out_channels)
    if min(geometry.output) < 1:
        raise MorphingKeyError(f"a {kernel} kernel leaves no output on {rows}x{columns} images")
    return geometry


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise MorphingKeyError("padding='same' with an even kernel pads unevenly; AugConv needs even padding")
        return tuple(k // 2 for k in conv.kernel_size)
    return tuple(conv.padding)


def _channel_order(order, out_channels: int) -> torch.Tensor:
    if order is None:
        return torch.arange(out_channels)
    permutation = torch.as_tensor(np.asarray(order)).long().flatten()
    if permutation.numel() != out_channels or not torch.equal(permutation.sort().values, torch.arange(out_channels)):
        raise MorphingKeyError(f"channel order must be a permutation of 0..{out_channels - 1}, got {np.asarray(order).tolist()}")
    return permutation


def _layout(key: HolderKey, geometry: _Geometry) -> _Layout:
    q = key.block_size
    if key.family == "repeated" and geometry.plane % q == 0:
        return _shared_layout(key, geometry)
    return _local_layout(key, geometry)


def _receptive_rows(geometry: _Geometry, group: int, group_rows: int) -> tuple[int, int]:
    """First and last domain rows read by the output rows of a group."""
    first = group * group_rows - geometry.offset[0]
    return first, first + group_rows + geometry.kernel[0] - 2


def _shared_layout(key: HolderKey, geometry: _Geometry) -> _Layout:
    """Blocks tile every image plane in the same pattern: one weight for all row groups."""
    q, columns = key.block_size, geometry.domain[1]
    period = math.lcm(q, columns)
    group_rows, blocks_per_group = period // columns, period // q
    plane_blocks = geometry.plane // q
    groups = math.ceil(geometry.output[0] / group_rows)
    first, last = _receptive_rows(geometry, 0, group_rows)
    candidates = np.arange(math.floor(first * columns / q) - 1, math.ceil((last + 1) * columns / q) + 1)
    top = np.floor_divide(candidates * q, columns)
    bottom = np.floor_divide(candidates * q + q - 1, columns)
    touched = candidates[(bottom >= first) & (top <= last)]

    slot_channel = np.repeat(np.arange(geometry.channels), touched.size)
    slot_block = np.tile(touched, geometry.channels)
    plane_block = slot_block[None, :] + blocks_per_group * np.arange(groups)[:, None]
    inside = (plane_block >= 0) & (plane_block < plane_blocks)
    block_index = np.where(inside, slot_channel * plane_blocks + plane_block, key.num_blocks)

    position = slot_block[:, None] * q + np.arange(q)  # plane positions, may lie outside the plane
    slots = slot_block.size
    return _Layout(
        group_rows=group_rows,
        block_index=torch.from_numpy(block_index).long(),
        channel=np.repeat(slot_channel[:, None], q, axis=1),
        row=np.floor_divide(position, columns),
        column=np.mod(position, columns),
        key_block=np.zeros(slots, dtype=np.int64),
        placements=np.stack([np.zeros(slots, dtype=np.int64), np.arange(slots), np.arange(slots)], axis=1),
        weight_groups=1,
    )


def _local_layout(key: HolderKey, geometry: _Geometry) -> _Layout:
    """Each output row (or, with a single block, the whole output) gets its own weight."""
    q, columns = key.block_size, geometry.domain[1]
    group_rows = geometry.output[0] if key.num_blocks == 1 else 1
    groups = math.ceil(geometry.output[0] / group_rows)
    flat = np.arange(key.size).reshape(key.num_blocks, q)
    channel, in_plane = np.divmod(flat, geometry.plane)
    row, column = np.divmod(in_plane, columns)
    bounds = np.array([_receptive_rows(geometry, h, group_rows) for h in range(groups)])
    touches = ((row[None] >= bounds[:, :1, None]) & (row[None] <= bounds[:, 1:, None])).any(axis=2)  # (groups, blocks)
    slots = int(touches.sum(axis=1).max())
    block_index = np.full((groups, slots), key.num_blocks, dtype=np.int64)
    placements = []
    for group in range(groups):
        touched = np.flatnonzero(touches[group])
        block_index[group, : touched.size] = touched
        placements.append(np.stack([np.full(touched.size, group), np.arange(touched.size), touched], axis=1))
    return _Layout(
        group_rows=group_rows,
        block_index=torch.from_numpy(block_index),
        channel=channel,
        row=row,
        column=column,
        key_block=np.array([key.block_for(k) for k in range(key.num_blocks)], dtype=np.int64),
        placements=np.concatenate(placements),
        weight_groups=groups,
    )


def _fused_weight(key: HolderKey, geometry: _Geometry, layout: _Layout, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of ``C^ac`` for every computed block, placed into the per-group weights."""
    q = key.block_size
    kh = geometry.kernel[0]
    oh, ow = geometry.offset
    out_rows, out_columns = geometry.output
    slots = layout.block_index.shape[1]
    fused = torch.zeros(
        layout.weight_groups, slots, q, geometry.out_channels, layout.group_rows, out_columns, dtype=dtype
    )
    inverse = key.blocks(inverse=True)
    top = layout.row.min(axis=1)
    window = int((layout.row.max(axis=1) - top).max()) + 1
    response_rows = window + kh - 1
    first_output_row = top - (kh - 1) + oh  # output row of each block's first response row

    row_bytes = geometry.out_channels * response_rows * out_columns * 8
    for units, entries in _chunks(len(top), q, max(1, CONSTRUCTION_CHUNK_BYTES // row_bytes)):
        count, width = len(units), entries.stop - entries.start
        images = torch.zeros(count, width, geometry.channels, window + 2 * (kh - 1), geometry.domain[1] + 2 * ow, dtype=torch.float64)
        unit = torch.arange(count)[:, None, None]
        entry = torch.arange(width)[None, :, None]
        channel = torch.from_numpy(layout.channel[units])[:, None, :]
        row = torch.from_numpy(layout.row[units] - top[units, None] + kh - 1)[:, None, :]
        column = torch.from_numpy(layout.column[units] + ow)[:, None, :]
        images[unit, entry, channel, row, column] = inverse[torch.from_numpy(layout.key_block[units])][:, entries, :]
        responses = F.conv2d(images.flatten(0, 1), weight).view(count, width, geometry.out_channels, response_rows, out_columns)
        selected = layout.placements[np.isin(layout.placements[:, 2], units)]
        if layout.group_rows == 1:
            _place_single_rows(fused, responses, selected, units[0], first_output_row, entries)
        else:
            _place_row_ranges(fused, responses, selected, units[0], first_output_row, entries, out_rows)
    return fused.reshape(layout.weight_groups, slots * q, -1).squeeze(0)


def _place_single_rows(fused, responses, selected, first_unit, first_output_row, entries) -> None:
    """One output row per group: move every placement's response row in one indexing step."""
    group, slot, unit = (torch.from_numpy(column) for column in selected.T)
    response_row = group - torch.from_numpy(first_output_row)[unit]
    valid = (response_row >= 0) & (response_row < responses.shape[3])
    fused[:, :, :, :, 0, :][group[valid], slot[valid], entries] = responses[
        unit[valid] - first_unit, :, :, response_row[valid], :
    ].to(fused.dtype)


def _place_row_ranges(fused, responses, selected, first_unit, first_output_row, entries, out_rows) -> None:
    """Groups of several output rows: each placement takes a contiguous range of response rows."""
    group_rows, response_rows = fused.shape[4], responses.shape[3]
    for group, slot, unit in selected.tolist():
        start = max(group * group_rows, first_output_row[unit])
        stop = min((group + 1) * group_rows, out_rows, first_output_row[unit] + response_rows)
        if start < stop:
            source = slice(start - first_output_row[unit], stop - first_output_row[unit])
            target = slice(start - group * group_rows, stop - group * group_rows)
            fused[group, slot, entries, :, target, :] = responses[unit - first_unit, :, :, source, :]


def _chunks(units: int, q: int, rows_per_chunk: int):
    """Split the rows of ``C^ac`` to compute into chunks of whole blocks, or of one block's rows."""
    if q > rows_per_chunk:
        for unit in range(units):
            for start in range(0, q, rows_per_chunk):
                yield np.array([unit]), slice(start, min(q, start + rows_per_chunk))
        return
    step = rows_per_chunk // q
    for start in range(0, units, step):
        yield np.arange(start, min(units, start + step)), slice(0, q)
