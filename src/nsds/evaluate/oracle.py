"""The oracle: each layer's (or module group's) measured sensitivity, and how well a ranking agrees with it.

The single-layer sensitivity of layer l is the perplexity when layer l alone is quantized to the low
width and every other layer keeps the checkpoint's weights; a module group's (e.g. "3.qkv") is the same
with only that group quantized. It is the ground truth a data-free score tries to predict, and costs one
evaluation per unit, so it is cached per model, quantizer, width, group size and token windows, and
written after every unit (an interrupted run resumes where it stopped).
"""

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nsds.errors import NsdsError
from nsds.files import keyed_cache_path, read_document, write_cache
from nsds.progress import note, progress

SCHEMA = "nsds.oracle/1"


def windows_digest(windows) -> str:
    """A short digest of the token windows (a torch tensor; torch is not imported here, so that reading
    saved results stays torch-free): part of every oracle key (other windows, other perplexities)."""
    return hashlib.sha256(windows.long().numpy().tobytes()).hexdigest()[:20]


def cache_path(key: dict[str, Any], folder: Path | None = None) -> Path:
    """Where the oracle for `key` lives: the cache folder, named by a digest of the key."""
    return keyed_cache_path("oracle", key, folder)


def single_layer_sensitivity(
    layers: int, measure: Callable[[list[int]], Iterable[tuple[int, float]]], key: dict[str, Any],
    path: Path | None = None,
) -> list[float]:  # fmt: skip
    """The perplexity of every layer quantized alone (see unit_sensitivity; measure(todo) takes and yields
    layer indices)."""

    def by_name(todo: list[str]) -> Iterable[tuple[str, float]]:
        for layer, ppl in measure([int(unit) for unit in todo]):
            yield str(layer), ppl

    units = [str(layer) for layer in range(layers)]
    return unit_sensitivity(units, by_name, key, path, "oracle (one layer at a time)")


def unit_sensitivity(
    units: Sequence[str],
    measure: Callable[[list[str]], Iterable[tuple[str, float]]],
    key: dict[str, Any],
    path: Path | None = None,
    desc: str = "oracle (one unit at a time)",
) -> list[float]:
    """The perplexity of every unit (a layer, a module group) quantized alone, reusing the units already
    cached under `key` (a file whose key differs is started afresh; one that cannot be read or holds
    anything but unit -> perplexity is reported as damaged and measured again). `measure(todo)` yields
    (unit, perplexity) for each unit of `todo`, in whatever order they finish (one at a time here, in
    parallel on Ray); each is cached as it arrives."""
    path = path or cache_path(key)
    done: dict[str, float] = {}
    if path.exists():
        try:
            done = _cached_ppl(path, key, units)
        except NsdsError as err:  # a damaged cache is only lost work: measure again
            note(f"{err}; measuring the oracle again")
    todo = [unit for unit in units if unit not in done]
    for unit, ppl in progress(measure(todo), desc=desc, total=len(todo), unit="unit"):
        done[unit] = float(ppl)
        write_cache(path, {"schema": SCHEMA, "key": key, "ppl": done}, "oracle cache")
    return [done[unit] for unit in units]


def _cached_ppl(path: Path, key: dict[str, Any], units: Sequence[str]) -> dict[str, float]:
    """The cached perplexities under `key` ({} when the file is for another key); NsdsError when damaged."""
    cached = read_document(path, SCHEMA, "oracle cache", lambda data: data)
    if "key" not in cached or "ppl" not in cached:
        raise NsdsError(f"oracle cache file '{path}' lacks its key or ppl")
    if cached["key"] != key:
        return {}
    ppl = cached["ppl"]
    if not isinstance(ppl, dict):
        raise NsdsError(f"oracle cache file '{path}': ppl is a {type(ppl).__name__}, not layer -> perplexity")
    done = {}
    for unit, value in ppl.items():
        if unit not in units:
            raise NsdsError(f"oracle cache file '{path}': {unit!r} is not one of the units measured")
        if not _positive_finite(value):
            raise NsdsError(f"oracle cache file '{path}': unit {unit} has perplexity {value!r}, not a positive number")
        done[unit] = float(value)
    return done


def _positive_finite(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an integer too large for a float
        return False


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the average ranks; NaN when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def kendall(x, y) -> float:
    """Kendall's tau-b (ties in either variable corrected); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordance = (dx * dy).sum()
    denominator = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float(concordance / denominator) if denominator > 0 else float("nan")
