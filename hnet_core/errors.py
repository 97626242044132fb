"""The one exception type for user mistakes.

Every error a user can cause (a missing file, a bad config, a wrong checkpoint) is raised as
`HNetError` with a one-line message naming the problem and what to do. The CLIs catch it and
print the message without a traceback. `assert` is kept for our own invariants only.
"""


class HNetError(ValueError):
    """A user-facing error with a one-line, actionable message."""

    def __init__(self, message: str):
        # Keep messages on one line so CLI output stays a single readable line.
        super().__init__(" ".join(str(message).split()))
