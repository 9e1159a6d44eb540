"""The notebook front ends: ``%quantize`` / ``%%quantize`` magics and the ``wb.panel`` app.

Nothing is imported here, so that ``%load_ext workbench`` stays quick (no onnxruntime, no
matplotlib, no ipywidgets until a panel is asked for).
"""
