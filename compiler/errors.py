class DeepfuseError(ValueError):
    """A clear, user-facing error: bad options, an invalid model configuration, bad input."""
