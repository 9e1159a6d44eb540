"""Models written in the structure of the libraries people use (torchvision, transformers),
built in code: nothing is downloaded. See ``vision`` and ``text``."""
