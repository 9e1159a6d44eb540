"""The model as the engine takes it: copy, module swapping, BN folding, stand-ins."""
