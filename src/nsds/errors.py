"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class NsdsError(Exception):
    """A problem with the user's input (path, model, file, option) that they can fix."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to one line (or its type when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
