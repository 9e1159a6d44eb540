"""ONNX files past protobuf's 2 GB limit: the graph in ``model.onnx``, every large tensor in one
``model.onnx.data`` beside it (ONNX's external data), written one tensor at a time.

A protobuf message cannot exceed 2 GB, so a model whose weights are larger cannot be one
``.onnx`` file. The large-model export (``onnx_export``) traces the model without its
parameters (``export_params=False``: they are graph inputs named after the state dict, and the
graph stays small), then :class:`ExternalDataWriter` streams each parameter, and each weight
the quantized layers store, from the tensors the model already holds into the ``.data`` file:
no step holds a serialized copy of the weights. ``Transpose(W)`` of a 2-D parameter (how the
TorchScript exporter writes ``nn.Linear`` without constant folding) is folded while writing,
so the FP32 file has ``MatMul(x, W^T)`` with an initializer, as the in-memory export does
(and as ONNX Runtime's ``MatMulNBitsQuantizer`` expects).

ONNX Runtime, ``onnx.load`` and ``onnx.checker.check_model(path)`` find the ``.data`` file
through the relative ``location`` stored with each tensor; keep both files in one folder.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from workbench.atomic_file import atomic_path

# files whose weights reach this size are written with external data (2 GiB: protobuf's limit
# for one message; the export's own tensors and graph fit below it, the weights do not)
EXTERNAL_DATA_BYTES = 2 * 1024**3
ALIGNMENT_BYTES = 4096  # offsets ONNX Runtime can memory-map
INLINE_MAX_BYTES = 1024  # smaller tensors stay in the .onnx file


def data_file_name(path: Path) -> str:
    return f"{path.name}.data"


class ExternalDataWriter:
    """Appends tensors to one ``.data`` file and returns the initializers that point at them."""

    def __init__(self, file, location: str) -> None:
        self.file = file
        self.location = location
        self.offset = 0

    def initializer(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """An initializer ``name`` whose values are written to the data file now."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_MAX_BYTES:
            return numpy_helper.from_array(array, name)
        padding = -self.offset % ALIGNMENT_BYTES
        if padding:
            self.file.write(b"\0" * padding)
            self.offset += padding
        data = memoryview(array.reshape(-1).view(np.uint8))
        self.file.write(data)
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self.location),
            ("offset", str(self.offset)),
            ("length", str(array.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return tensor

    def move_out(self, graph: onnx.GraphProto) -> None:
        """Every initializer held in ``graph`` past ``INLINE_MAX_BYTES`` goes to the file."""
        for index, init in enumerate(graph.initializer):
            if init.data_location == onnx.TensorProto.EXTERNAL:
                continue
            if len(init.raw_data) < INLINE_MAX_BYTES and _element_count(init) < 256:
                continue
            array = numpy_helper.to_array(init)
            graph.initializer[index].CopyFrom(self.initializer(init.name, array))


def _element_count(init: onnx.TensorProto) -> int:
    return int(np.prod(init.dims)) if init.dims else 1


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


def materialize_inputs(
    graph: onnx.GraphProto, tensors: Mapping[str, torch.Tensor], writer: ExternalDataWriter
) -> None:
    """The graph inputs named after ``tensors`` (parameters traced with
    ``export_params=False``) become initializers written by ``writer``; a ``Transpose`` that
    only reorders such a 2-D tensor is folded into a transposed initializer."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    folded: list[onnx.NodeProto] = []
    kept_inputs = []
    for value in graph.input:
        tensor = tensors.get(value.name)
        if tensor is None:
            kept_inputs.append(value)
            continue
        users = consumers.get(value.name, [])
        plain_users = []
        for node in users:
            perm = next((a.ints for a in node.attribute if a.name == "perm"), None)
            if node.op_type == "Transpose" and tensor.dim() == 2 and list(perm or [1, 0]) == [1, 0]:
                graph.initializer.append(writer.initializer(node.output[0], as_numpy(tensor.t())))
                folded.append(node)
            else:
                plain_users.append(node)
        if plain_users:
            graph.initializer.append(writer.initializer(value.name, as_numpy(tensor)))
    del graph.input[:]
    graph.input.extend(kept_inputs)
    for node in folded:
        graph.node.remove(node)


@contextmanager
def external_data_files(path: Path) -> Iterator[tuple[Path, ExternalDataWriter]]:
    """Temporary ``.onnx`` and ``.data`` paths beside ``path`` and a writer into the data file;
    both replace ``path`` and its ``.data`` file when the block succeeds, and are removed when it
    fails (an existing model is left untouched)."""
    data_target = path.with_name(data_file_name(path))
    with (
        atomic_path(path, ".onnx") as model_temporary,
        atomic_path(data_target, ".data") as data_temporary,
        open(data_temporary, "wb") as file,
    ):
        # the graph names the final data file; it is renamed into place before the graph
        yield model_temporary, ExternalDataWriter(file, data_target.name)


def save_graph(proto: onnx.ModelProto, path: Path) -> None:
    """Write the (small) graph part of a model whose large tensors are external."""
    with open(path, "wb") as file:
        file.write(proto.SerializeToString())


def fill_placeholders(
    graph: onnx.GraphProto,
    arrays_of: Callable[[str], Mapping[str, np.ndarray] | None],
    writer: ExternalDataWriter,
    owner_of: Callable[[str], tuple[str, str] | None],
) -> None:
    """Replace placeholder initializers by their real values, one owner at a time.

    ``owner_of(initializer name)`` gives ``(owner, key)`` for a placeholder (else None);
    ``arrays_of(owner)`` computes that owner's arrays by key (a quantized layer's stored
    weight, scales, zero points), which are written and then dropped before the next owner."""
    by_owner: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for index, init in enumerate(graph.initializer):
        found = owner_of(init.name)
        if found is not None:
            by_owner[found[0]].append((index, found[1]))
    for owner, entries in by_owner.items():
        arrays = arrays_of(owner) or {}
        for index, key in entries:
            if key in arrays:
                name = graph.initializer[index].name
                graph.initializer[index].CopyFrom(writer.initializer(name, arrays[key]))
        del arrays


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The data files (relative locations) the initializers of ``model`` point at."""
    return {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }


def has_external_data(path: str | os.PathLike) -> bool:
    """Whether the model at ``path`` keeps tensors in a data file beside it (as written here)."""
    path = Path(path)
    return path.with_name(data_file_name(path)).is_file()


def model_file_bytes(path: str | os.PathLike) -> int:
    """Size of the model at ``path``: the ``.onnx`` file and its data file, when it has one."""
    path = Path(path)
    data = path.with_name(data_file_name(path))
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
