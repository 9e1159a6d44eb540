"""QAT: the training loop, its options, live BatchNorm, distributed jobs."""
