"""The single progress helper: every long step reports through here, never through print."""

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
