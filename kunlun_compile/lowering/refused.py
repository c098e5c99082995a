"""The one exception instruction selection raises for what it cannot lower (its message is the near miss)."""


class Refused(Exception):
    """This node or cluster cannot be lowered; the message says why (shown as a near miss)."""
