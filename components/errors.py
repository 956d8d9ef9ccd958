"""The one error type for a user's mistakes (bad config, bad path, bad data layout).

Programming errors stay ordinary exceptions; anything a user can fix by changing what they
passed raises :class:`ReprflowError` with a message that says what to change. The CLI turns it
into one line on stderr and exit code 2.
"""


class ReprflowError(Exception):
    """A problem with the user's input; the message says what to change."""
