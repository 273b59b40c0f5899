"""Errors raised while reading model configs, checkpoints and tokenizers."""


class ModelLoadError(ValueError):
    """A model directory, config, checkpoint file or tensor could not be used.

    The message always names the file (and tensor, where there is one) and says
    what was expected.
    """
