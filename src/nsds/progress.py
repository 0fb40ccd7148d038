"""The single progress helper: every long step reports through here, never through print.

On a terminal, steps show as progress bars; otherwise (a log, CI) each stage still writes one plain line,
so a long run is never silent for minutes.
"""

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar on stderr; silent when stderr is not a terminal."""
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def byte_bar(desc: str, total: int | None) -> tqdm:
    """A bar counting bytes, for downloads and file assembly."""
    return tqdm(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


_STARTED = time.perf_counter()


def note(message: str) -> None:
    """One line on stderr: a stage starting (with the seconds since nsds started) or a warning."""
    print(f"nsds [{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def stage(message: str) -> None:
    """A stage starting: a log line when stderr is not a terminal (on a terminal the bars show it)."""
    if not sys.stderr.isatty():
        note(message)
