"""Where quantizers go: quantized layers, call sites, op kinds, the data flow."""
