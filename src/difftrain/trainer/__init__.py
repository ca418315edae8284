"""The trainer: the process torchrun starts in every pod (``python -m difftrain.trainer``)."""
