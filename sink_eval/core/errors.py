"""The one exception type sink_eval raises for bad input; its message always says what to do."""


class SinkEvalError(Exception):
    """A user-facing error: the message names the problem and the fix."""
