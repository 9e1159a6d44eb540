"""Block-wise (grouped) layout: one scale per output channel and per group of inputs.

A 2-D weight ``W [out, in]`` with ``group_size g`` has ``G = ceil(in / g)`` groups per row;
its scale and zero point have shape ``[out, G]``. The math of every group is the per-channel
math of the rows of a grouped view ``[out * G, g]`` (the last group padded with zeros, which
change no range: a quantization range always includes 0, and 0.0 quantizes exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.core.scheme import Scheme
from workbench.errors import ConfigError


def group_count(in_features: int, group_size: int) -> int:
    """Groups per row: ``ceil(in / g)`` (the last one may be partial)."""
    return -(-in_features // group_size)


def check_blockwise_tensor(x: torch.Tensor, scheme: Scheme) -> None:
    """A block-wise scheme applies to 2-D ``[out, in]`` weights only."""
    if x.dim() != 2:
        raise ConfigError(
            f"a block-wise scheme (group_size={scheme.group_size}) applies to 2-D Linear "
            f"weights [out, in], got a {x.dim()}-D tensor of shape {tuple(x.shape)}; use "
            "group_size=None (per-channel) for conv weights"
        )


def grouped_rows(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [out, in]`` as ``[out * G, g]`` rows, one per group (last group zero-padded)."""
    columns = x.shape[1]
    padding = group_count(columns, group_size) * group_size - columns
    if padding:
        x = F.pad(x, (0, padding))
    return x.reshape(-1, group_size)


def ungrouped(rows: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`grouped_rows`: back to ``shape`` (padding dropped)."""
    out, columns = shape
    return rows.reshape(out, -1)[:, :columns]


def expand_groups(param: torch.Tensor, columns: int, group_size: int) -> torch.Tensor:
    """A per-group ``[out, G]`` parameter repeated over its group's inputs: ``[out, in]``."""
    return param.repeat_interleave(group_size, dim=1)[:, :columns]
