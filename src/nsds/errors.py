"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class NsdsError(Exception):
    """A problem with the user's input (path, model, file, option) that they can fix."""
