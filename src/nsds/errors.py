"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class NsdsError(Exception):
    """A problem with the user's input (path, model, file, option) that they can fix."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to one line (or its type when it has none), for one-line errors.

    A first line that only announces what follows ("Class validation error for validator 'x':", as
    huggingface_hub's strict dataclasses write) is joined with the next line, which holds the reason.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
