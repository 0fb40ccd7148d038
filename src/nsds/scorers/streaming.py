"""The concurrent machinery behind the NSDS scorer: read layers on the main thread, measure them on workers.

Kept apart from the method (scorers/nsds.py) so the method reads top to bottom. Each layer is measured
in two parts: a first part that needs only the layer, and a second part that also needs one shared
prerequisite computed once (for NSDS: the readout basis of W_U, needed by the writer roles). The main
thread reads the next layer while workers measure; at most `max_layers` layers are held at once.
"""

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from nsds.compute import Compute
from nsds.errors import NsdsError
from nsds.progress import progress
from nsds.weights.base import WeightSource

Layer = TypeVar("Layer")
Shared = TypeVar("Shared")
Part = dict  # one part's measurements, merged per layer


class TimedReader:
    """Reads tensors from a source, timing the I/O (and GGUF dequantization) apart from the maths."""

    def __init__(self, source: WeightSource) -> None:
        self.source = source
        self.names = source.names()
        self.seconds = 0.0
        self._lock = threading.Lock()  # MoE experts are read on the workers that measure them

    def __call__(self, name: str) -> torch.Tensor:
        self._check_name(name)
        return self._timed(name, lambda: self.source.tensor(name))

    def part(self, name: str, index: int) -> torch.Tensor:
        """One expert of a stacked 3-D tensor (source.part)."""
        self._check_name(name)
        return self._timed(name, lambda: self.source.part(name, index))

    def row_blocks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """The tensor `rows` rows at a time (see WeightSource.row_blocks), each read timed."""
        self._check_name(name)
        blocks = self.source.row_blocks(name, rows)
        while True:
            start = time.perf_counter()
            block = next(blocks, None)
            with self._lock:
                self.seconds += time.perf_counter() - start
            if block is None:
                return
            yield self._checked(name, block)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the source's header where it has one."""
        self._check_name(name)
        return self.source.shape(name)

    def _timed(self, name: str, read: Callable[[], torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        tensor = self._checked(name, read())
        with self._lock:
            self.seconds += time.perf_counter() - start
        return tensor

    def _check_name(self, name: str) -> None:
        if name not in self.names:
            raise NsdsError(f"the weights hold no tensor '{name}': the checkpoint is incomplete")

    @staticmethod
    def _checked(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise NsdsError(f"tensor '{name}' has dtype {tensor.dtype}; nsds scores floating-point weights")
        return tensor


@dataclass(frozen=True)
class Workers:
    """How many layers to measure at once (`count`), and to hold at once (`max_layers`)."""

    count: int
    max_layers: int

    @classmethod
    def for_layers(cls, layer_bytes: int, compute: Compute, budget_bytes: int = 2 << 30) -> "Workers":
        """On a CPU, one single-threaded layer per core beats one multi-threaded layer (LAPACK's eigh
        scales poorly across threads), as long as the layers in flight fit the memory budget; a GPU runs one."""
        fits = max(1, budget_bytes // layer_bytes)
        count = 1 if compute.device != "cpu" else max(1, min(torch.get_num_threads(), fits))
        return cls(count, max(count + 1, fits))


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_layers(
    count: int,
    read: Callable[[int], Layer],
    first: Callable[[Layer], Part],
    shared: Callable[[], Shared],
    accept: Callable[[Shared], None],
    second: Callable[[Layer, Shared], Part],
    merge: Callable[[int, list[Future]], Part],
    workers: Workers,
) -> tuple[list[Part], Shared]:
    """[merge(i, parts of layer i) for every layer], and the shared value.

    `shared()` runs on a worker while the others measure the first parts of the first layers; once it is
    done, `accept` checks it on the main thread and every waiting layer's second part is queued. Nothing
    here keeps `shared` (and what it holds, e.g. W_U) alive once it has run.
    """
    schedule = _Schedule(first, second, merge, accept, workers)
    threads = 1 if workers.count > 1 else torch.get_num_threads()
    # Each worker thread sets its own count: MKL and OpenMP in a new thread otherwise use every core,
    # whatever the main thread set (two "single-threaded" workers each ran eigh on all cores).
    initial = {"initializer": torch.set_num_threads, "initargs": (threads,)}
    with _torch_threads(threads), ThreadPoolExecutor(workers.count, **initial) as pool:
        task = pool.submit(shared)
        del shared
        return schedule.run(pool, count, read, task)


class _Schedule(Generic[Layer, Shared]):
    def __init__(self, first, second, merge, accept, workers: Workers) -> None:
        self.first, self.second, self.merge, self.accept, self.workers = first, second, merge, accept, workers
        self.parts: dict[int, list[Future]] = {}
        self.waiting: deque[tuple[int, Layer]] = deque()  # layers whose second part needs the shared value
        self.shared_task: Future | None = None
        self.shared: Shared | None = None
        self.ready = False

    def _queue_second(self, pool: ThreadPoolExecutor, block: bool) -> None:
        if not self.waiting or not (block or self.shared_task.done()):
            return
        if not self.ready:
            self.shared = self.shared_task.result()
            self.accept(self.shared)
            self.ready = True
        while self.waiting:
            j, layer = self.waiting.popleft()
            self.parts[j].append(pool.submit(self.second, layer, self.shared))

    def run(self, pool: ThreadPoolExecutor, count: int, read, shared_task: Future) -> tuple[list[Part], Shared]:
        self.shared_task = shared_task
        done: list[Part] = []
        for i in progress(range(count), desc="scoring layers", unit="layer"):
            while i - len(done) >= self.workers.max_layers:
                self._queue_second(pool, block=True)
                done.append(self.merge(len(done), self.parts.pop(len(done))))
            layer = read(i)
            self.parts[i] = [pool.submit(self.first, layer)]
            self.waiting.append((i, layer))
            self._queue_second(pool, block=False)
        self._queue_second(pool, block=True)
        if not self.ready:  # a model with no layers still gets its shared value checked
            self.shared = self.shared_task.result()
            self.accept(self.shared)
        done.extend(self.merge(i, self.parts.pop(i)) for i in range(len(done), count))
        return done, self.shared
