"""The quantizer modules and their modes (static, QAT, dynamic, on / off)."""
