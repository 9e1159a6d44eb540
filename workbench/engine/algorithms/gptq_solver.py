"""GPTQ's column solver: the codes of one weight matrix for the Hessian of its inputs
(Frantar et al. 2023, Algorithm 1; the reference code's ``fasterquant``).

    H += damp * mean(diag H) * I                                    (dampening)
    U = cholesky(H^-1)^T                                            (upper triangular, once)
    for each column j:  q_j = Q(w_j),  e_j = (w_j - q_j) / U_jj,  w_k -= e_j U_jk  (k > j)

The updates are applied lazily, as the reference does: the columns are taken ``BLOCK_SIZE``
at a time, the per-column loop updates only the columns of its block, and the rest of the
matrix takes the block's errors in one matrix product. The matrix is held transposed
(``[cols, rows]``) so that a column is one contiguous row: rounding it and the rank-1 update
of the block's remaining columns (``addr_``, in place) run on contiguous memory, on one
thread. Inputs never
seen (``H_jj = 0``, dead columns) get a zero weight. With ``act_order`` the columns are taken
in order of decreasing ``H_jj`` and the permutation is undone at the end. With block-wise
(per-group) scales, a group's scale is computed from the weights as updated when its first
column is reached, as the reference code does; with ``act_order`` too, the group scales are
fixed from the original weights first ("static groups"), so that every group stays a
contiguous run of input columns as the export needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from workbench.core.observers import weight_range_mse
from workbench.core.qparams import qparams_from_range
from workbench.core.qtensor import tensor_range
from workbench.core.scheme import Scheme

BLOCK_SIZE = 128  # columns updated together (lazy batch updates)
DAMP_FRACTION = 0.01  # dampening: this fraction of the mean Hessian diagonal


@dataclass
class GPTQCodes:
    """GPTQ's result for one weight matrix ``[rows, cols]``: integer codes and one scale /
    zero point per row and group (``groups`` = 1 without block-wise scales)."""

    codes: torch.Tensor  # int16 (up to 8 bits) or int32 [rows, cols]
    scale: torch.Tensor  # float32 [rows, groups]
    zero_point: torch.Tensor  # int32 [rows, groups]
    group_size: int | None

    def dequantize(self) -> torch.Tensor:
        """``s * (q - z)`` as a float32 ``[rows, cols]`` matrix."""
        scale, zero_point = expand_groups(
            self.scale, self.zero_point, self.codes.shape[1], self.group_size
        )
        return (self.codes.to(torch.float32) - zero_point) * scale


def expand_groups(
    scale: torch.Tensor, zero_point: torch.Tensor, cols: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``[rows, groups]`` qparams repeated to one per weight ``[rows, cols]``
    (groups of ``group_size`` columns, the last one partial; one group without it)."""
    size = group_size or cols
    scale = scale.repeat_interleave(size, dim=1)[:, :cols]
    zero_point = zero_point.to(torch.float32).repeat_interleave(size, dim=1)[:, :cols]
    return scale, zero_point


def row_qparams(
    weight: torch.Tensor, scheme: Scheme, observer: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale / zero point per row of ``weight`` (a group of columns), ``[rows, 1]``."""
    per_row = Scheme(scheme.bits, scheme.symmetric, True, 0, scheme.narrow_range)
    if observer == "mse":
        low, high = weight_range_mse(weight, per_row)
    else:
        low, high = tensor_range(weight, per_row)
    scale, zero_point = qparams_from_range(low, high, per_row, "weight")
    return scale.unsqueeze(1), zero_point.unsqueeze(1)


@dataclass
class _Grid:
    """The qparams of every group, transposed (``[groups, rows]``: one contiguous row per
    group, as the transposed weight), with ``1 / scale`` kept for rounding."""

    scale: torch.Tensor  # float32 [groups, rows]
    zero_point: torch.Tensor  # float32 [groups, rows]
    inverse_scale: torch.Tensor  # float32 [groups, rows]

    @classmethod
    def empty(cls, groups: int, rows: int) -> _Grid:
        return cls(*(torch.zeros(groups, rows, dtype=torch.float32) for _ in range(3)))

    def set(self, group: int, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale[group] = scale.reshape(-1).to(torch.float32)
        self.zero_point[group] = zero_point.reshape(-1).to(torch.float32)
        self.inverse_scale[group] = 1.0 / self.scale[group]

    def round(self, column: torch.Tensor, group: int, scheme: Scheme) -> tuple:
        """Codes of one column (``q = clamp(round(w / s) + z)``, as core.qtensor computes
        them) and their dequantized values."""
        zero_point = self.zero_point[group]
        codes = torch.round(column * self.inverse_scale[group]).add_(zero_point)
        codes.clamp_(scheme.quant_min, scheme.quant_max)
        return codes, (codes - zero_point).mul_(self.scale[group])


@dataclass
class HessianFactor:
    """What the column solver needs of a Hessian, computed once for every layer that reads
    the same inputs (q / k / v, gate / up): the column order, the dead columns and the upper
    Cholesky factor of the dampened ``H^-1`` in that order."""

    upper: torch.Tensor  # float32 [cols, cols]
    order: torch.Tensor  # int64 [cols]: decreasing H_jj with act_order, else 0..cols-1
    dead: torch.Tensor  # bool [cols]: inputs never seen (H_jj = 0)
    act_order: bool


def factor_hessian(
    hessian: torch.Tensor, act_order: bool = False, damp_fraction: float = DAMP_FRACTION
) -> HessianFactor:
    """``hessian`` ([cols, cols]) factored for ``gptq_quantize``: dead columns' diagonal set
    to 1, the columns in ``order``, ``damp_fraction`` of the mean diagonal added to it."""
    cols = hessian.shape[0]
    diagonal = torch.diagonal(hessian.detach()).to(torch.float32)
    dead = diagonal == 0
    diagonal = torch.where(dead, torch.ones_like(diagonal), diagonal)
    order = torch.arange(cols)
    if act_order:
        order = torch.argsort(diagonal, descending=True, stable=True)
    mean = float(torch.mean(diagonal))
    upper = _inverse_cholesky_upper(
        hessian.detach(), order if act_order else None, dead, mean, damp_fraction
    )
    return HessianFactor(upper, order, dead, act_order)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    scheme: Scheme,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    act_order: bool = False,
    observer: str = "minmax",
    block_size: int = BLOCK_SIZE,
    damp_fraction: float = DAMP_FRACTION,
) -> GPTQCodes:
    """GPTQ codes of ``weight`` (``[rows, cols]``) for the Hessian ``hessian`` (``[cols, cols]``,
    or its ``factor_hessian``, whose ``act_order`` then applies).

    Without ``group_size`` the grid is ``scale`` / ``zero_point`` (0-d or one per row; the
    layer's own qparams), or one computed per row from ``weight`` when they are None. With
    ``group_size`` each run of ``group_size`` columns gets its own scale per row.
    """
    rows, cols = weight.shape
    if isinstance(hessian, torch.Tensor):
        hessian = factor_hessian(hessian, act_order, damp_fraction)
    act_order = hessian.act_order
    w_t = weight.detach().to(torch.float32).t().contiguous()  # [cols, rows]: a column per row
    w_t[hessian.dead] = 0.0
    if group_size is not None:
        block_size = -(-block_size // group_size) * group_size  # a group lies in one block
        grid = _Grid.empty(-(-cols // group_size), rows)
        if act_order:  # static groups: fixed from the weights before any update
            for g in range(grid.scale.shape[0]):
                group_rows = w_t[g * group_size : (g + 1) * group_size]
                grid.set(g, *row_qparams(group_rows.t(), scheme, observer))
    else:
        if scale is None or zero_point is None:
            scale, zero_point = row_qparams(w_t.t(), scheme, observer)
        grid = _Grid.empty(1, rows)
        grid.set(0, scale.detach().reshape(-1).expand(rows), zero_point.reshape(-1).expand(rows))
    order = hessian.order
    if act_order:
        w_t = w_t[order]
    groups = (order // group_size).tolist() if group_size is not None else [0] * cols
    # without act_order a group's scales come from the weights as updated when it is reached
    scales_on_the_way = group_size if group_size is not None and not act_order else None
    codes_t = _solve_columns(
        w_t, hessian.upper, grid, groups, scheme, scales_on_the_way, observer, block_size
    )
    del w_t  # before the codes' transposed copy (an LM head's: 262 MB)
    if act_order:
        codes_t = codes_t[torch.argsort(order)]
    scales = grid.scale.t().contiguous()
    zero_points = grid.zero_point.t().to(torch.int32).contiguous()
    return GPTQCodes(codes_t.t().contiguous(), scales, zero_points, group_size)


def _solve_columns(
    w_t: torch.Tensor,
    h_inv_upper: torch.Tensor,
    grid: _Grid,
    groups: list[int],
    scheme: Scheme,
    scales_on_the_way: int | None,
    observer: str,
    block_size: int,
) -> torch.Tensor:
    """The codes ``[cols, rows]`` of the transposed weight ``w_t`` (updated in place), one
    column at a time, ``block_size`` columns per lazy update; with ``scales_on_the_way`` (the
    group size) each group's scales are set when its first column is reached."""
    cols, rows = w_t.shape
    # 8-bit codes and below fit int16: half the bytes of float32 (an LM head's 32000 rows)
    codes_t = torch.zeros(cols, rows, dtype=torch.int16 if scheme.bits <= 8 else torch.int32)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w_t[start:end]  # a view: the block's columns, updated in place
        errors = torch.zeros_like(block)
        h_inv = h_inv_upper[start:end, start:end]
        with one_thread():
            for i in range(end - start):
                column = start + i
                if scales_on_the_way is not None and column % scales_on_the_way == 0:
                    group_rows = block[i : i + scales_on_the_way]
                    grid.set(groups[column], *row_qparams(group_rows.t(), scheme, observer))
                codes_t[column], dequantized = grid.round(block[i], groups[column], scheme)
                error = (block[i] - dequantized).div_(h_inv[i, i])
                block[i + 1 :].addr_(h_inv[i, i + 1 :], error, alpha=-1.0)
                errors[i] = error
        w_t[end:].addmm_(h_inv_upper[start:end, end:].t(), errors, alpha=-1.0)
    return codes_t


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside: the per-column ops are small (one column, one block), and
    splitting each across threads costs more in synchronisation than it saves (a 5632 x 2048
    matrix on two cores at load 7: 15.5 s with the loop on two threads, 1.7 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky_upper(
    hessian: torch.Tensor,
    order: torch.Tensor | None,
    dead: torch.Tensor,
    mean_diagonal: float,
    damp_fraction: float,
) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) for ``H`` = ``hessian`` with
    its columns in ``order`` (None: as they are), the ``dead`` diagonal entries 1 and
    ``damp_fraction`` of ``mean_diagonal`` added to the diagonal; more dampening when ``H`` is
    numerically singular.

    With ``J`` the reversal of rows and columns and ``L`` the lower Cholesky factor of
    ``J H J``: ``H^-1 = J L^-T L^-1 J = U^T U`` for ``U = J L^-1 J``, upper triangular with a
    positive diagonal, so the (unique) factor. One Cholesky and one triangular inverse
    (LAPACK ``trtri``, in place) in float64 instead of a Cholesky, ``cholesky_inverse`` and a
    second Cholesky: half the arithmetic (5632 columns: 3.3 s -> 1.8 s on two cores), and
    one float64 matrix alive at a time besides ``hessian``."""
    for attempt in range(8):
        damp = mean_diagonal * (damp_fraction + (0.0 if attempt == 0 else 10.0 ** (attempt - 3)))
        lower, info = torch.linalg.cholesky_ex(_reversed_float64(hessian, order, dead, damp))
        if int(info) == 0:
            inverse = _lower_triangular_inverse(lower)
            del lower
            if inverse is not None:
                upper = inverse.to(torch.float32)
                del inverse
                return upper.flip(0, 1)
    raise RuntimeError("the Hessian of the layer's inputs could not be factorised")


def _reversed_float64(
    hessian: torch.Tensor, order: torch.Tensor | None, dead: torch.Tensor, damp: float
) -> torch.Tensor:
    """``J P H P^T J`` in float64 (``P`` the permutation ``order``), its ``dead`` diagonal
    entries 1 and ``damp`` added to its diagonal."""
    if order is None:
        reverse = torch.arange(hessian.shape[0] - 1, -1, -1)
        h = hessian.flip(0, 1).to(torch.float64)
    else:
        reverse = order.flip(0)
        h = hessian.index_select(0, reverse).index_select(1, reverse).to(torch.float64)
    diagonal = h.diagonal()
    diagonal[dead[reverse]] = 1.0
    diagonal.add_(damp)
    return h


def _lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor | None:
    """``L^-1`` of a float64 lower-triangular ``L`` (overwriting it where its memory is
    column-major, as ``torch.linalg.cholesky`` returns it); None when ``L`` is singular."""
    from scipy.linalg import lapack  # here: importing scipy.linalg costs 0.27 s

    array = lower.numpy()
    if not array.flags.f_contiguous:
        array = np.asfortranarray(array)
    inverse, info = lapack.dtrtri(array, lower=1, overwrite_c=1)
    return torch.from_numpy(inverse) if info == 0 else None
