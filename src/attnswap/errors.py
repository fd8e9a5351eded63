"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class AttnswapError(ValueError):
    """A user-facing error: the message names the bad value and what to do instead."""
