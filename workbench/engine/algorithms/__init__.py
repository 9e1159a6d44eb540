"""PTQ algorithms: GPTQ, AdaRound, SmoothQuant, equalization, bias correction."""
