"""Export-time stand-ins for average pools: an adaptive pool whose output size divides its
input becomes a plain AvgPool (else the averaging matrices adaptive pooling applies), and an
AvgPool over its whole input a global one, so that ONNX Runtime fuses them on uint8
(QLinearAveragePool / QLinearGlobalAveragePool)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)

AVG_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class ExportAdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool{1,2,3}d`` as the plain average pool it is when each input size is a
    multiple of its output size (VGG's ``(7, 7)`` on 7x7 or 14x14 maps): the TorchScript
    exporter can only export adaptive pooling to sizes other than 1 when it sees the input's
    static sizes, which no autograd-Function stand-in keeps. Uneven windows (``(7, 7)`` on a
    10x10 map) become the averaging matrices adaptive pooling applies along each axis
    (window ``[floor(i S / O), ceil((i + 1) S / O))``), fixed for the exported spatial size:
    MatMuls on constants, in FP32 (ONNX has no adaptive pooling)."""

    quantization_leaf = True  # one call site, as the pooling module it stands in for

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.dims = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[
            type(pool)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = [int(size) for size in x.shape[-self.dims :]]
        wanted = self.pool.output_size
        wanted = [wanted] * self.dims if isinstance(wanted, int) else list(wanted)
        wanted = [
            size if out is None else int(out) for size, out in zip(sizes, wanted, strict=True)
        ]
        if all(out == 1 for out in wanted):
            return self.pool(x)  # global pooling exports as it is
        if any(s % o for s, o in zip(sizes, wanted, strict=True)):
            return _averaging_matrices(x, sizes, wanted)
        kernel = [s // o for s, o in zip(sizes, wanted, strict=True)]
        return AVG_POOLS[self.dims](x, kernel, kernel)


class ExportWholeInputAvgPool(nn.Module):
    """``nn.AvgPool{1,2,3}d`` whose one window covers its whole input (transformers'
    EfficientNet pools with ``AvgPool2d(hidden_dim, ceil_mode=True)`` on a 1x1 map), exported
    as the global average pool it computes: PyTorch divides such a window by the input's size,
    ONNX Runtime's QLinearAveragePool does not (measured: cosine 0.0 to the simulation on
    EfficientNet's pooler). Any other window exports as the pool."""

    quantization_leaf = True

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.dims = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(pool)]

    def _covers_input(self, sizes: list[int]) -> bool:
        def per_axis(value) -> list[int]:
            return [int(value)] * self.dims if isinstance(value, int) else [int(v) for v in value]

        return (
            all(p == 0 for p in per_axis(self.pool.padding))
            and self.pool.divisor_override is None
            and all(k >= s for k, s in zip(per_axis(self.pool.kernel_size), sizes, strict=True))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a window covering the input gives one output per axis (PyTorch refuses any fewer)
        if self._covers_input([int(size) for size in x.shape[-self.dims :]]):
            return ADAPTIVE_AVG_POOL_FUNCTIONS[self.dims](x, 1)
        return self.pool(x)


ADAPTIVE_AVG_POOL_FUNCTIONS = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
}


def averaging_matrix(size: int, out: int) -> torch.Tensor:
    """``[out, size]``: row i averages adaptive pooling's window i of an axis of ``size``."""
    matrix = torch.zeros(out, size, dtype=torch.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _averaging_matrices(x: torch.Tensor, sizes: list[int], wanted: list[int]) -> torch.Tensor:
    dims = len(sizes)
    for offset, (size, out) in enumerate(zip(sizes, wanted, strict=True)):
        axis = x.dim() - dims + offset
        if size == out:
            continue
        moved = x.transpose(axis, -1)
        x = torch.matmul(moved, averaging_matrix(size, out).t().to(x.dtype)).transpose(axis, -1)
    return x
