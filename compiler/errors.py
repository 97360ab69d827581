class DeepfuseError(ValueError):
    """A clear, user-facing error: bad options, an invalid model configuration, bad input."""


class RewriteError(DeepfuseError):
    """A rewrite that would change what the graph computes (an output of another dtype or rank than the value it
    replaces): a bug in a pass. The region is left as it was; the pipeline logs it and runs the next pass."""
