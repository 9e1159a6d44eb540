"""INT8 ONNX export, ONNX Runtime sessions, benchmark, fusion and parity checks.

Imported only when asked for (``result.export_onnx``, ``wb.benchmark``): ``import workbench``
does not import onnx or onnxruntime.
"""
