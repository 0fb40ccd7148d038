"""Ray: `nsds score --ray` scores layers as tasks, `nsds compare --ray` evaluates on one model copy per worker.

Ray is optional: only the CLI and `compare` import this module, and only with `--ray`; it imports Ray
inside its functions, so the default path never loads Ray. Every task opens the weights itself from a path on the shared
filesystem (a picklable description) and returns only numbers: a layer's raw metrics, a perplexity.

Scoring: one task computes W_U's readout complement; one task per layer reads its tensors, measures
the roles that need only the layer, then waits for the complement (a Ray object) and measures the
writer roles. The driver keeps at most `workers` layer tasks in flight, so a cluster holds at most that
many layers at once. The tasks run the same functions as the single-process path, one layer per
single-threaded CPU worker (what that path does on a multi-core CPU), so the scores are identical.
"""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nsds import arch
from nsds.compute import PRECISIONS, Compute
from nsds.config import CompareConfig
from nsds.errors import NsdsError
from nsds.evaluate.jobs import PerplexityJob, measure
from nsds.layerwise import load_model
from nsds.progress import progress, stage
from nsds.quantize import WeightBank, make_quantizer
from nsds.scorers import nsds
from nsds.scorers.streaming import TimedReader
from nsds.scores import ScoreReport
from nsds.weights import open_source, resolve

THREADS = 1  # torch threads per CPU task: one layer per core beats one layer on many (streaming.Workers)


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address`, or start a local one when it is empty or None (Ray's own
    RAY_ADDRESS is honoured then); a one-line error when Ray is not installed."""
    try:
        import ray
    except ModuleNotFoundError:
        raise NsdsError("--ray needs Ray: pip install 'nsds[ray]'") from None
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


def compute_for(device: str, precision: str) -> Compute:
    """Where tasks compute: `auto` is a GPU per task when the cluster has GPUs (the driver may have none)."""
    import ray

    if precision not in PRECISIONS:
        raise NsdsError(f"unknown precision '{precision}' (use float64 or float32)")
    gpus = ray.cluster_resources().get("GPU", 0)
    kind = ("cuda" if gpus else "cpu") if device == "auto" else device.partition(":")[0]
    if kind not in ("cpu", "cuda"):
        raise NsdsError(f"unknown device '{device}'; use cpu, cuda or auto")
    if kind == "cuda" and not gpus:
        raise NsdsError(f"--device {device} was asked for but the Ray cluster has no GPU; use --device cpu")
    return Compute(device=kind, dtype=PRECISIONS[precision])  # a task sees only the GPU Ray gave it


def workers_for(compute: Compute, workers: int | None) -> int:
    """Tasks (or model copies) at once: as asked, else one per GPU, else one per CPU of the cluster."""
    import ray

    if workers is not None:
        if workers < 1:
            raise NsdsError(f"--ray-workers must be at least 1, got {workers}")
        return workers
    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU" if compute.device == "cuda" else "CPU", 1)))


def _options(compute: Compute) -> dict[str, Any]:
    return {"num_cpus": THREADS, "num_gpus": 1 if compute.device == "cuda" else 0}


@contextmanager
def _task_errors() -> Iterator[None]:
    """An NsdsError raised in a task or an actor re-raised as itself (one line, exit 2)."""
    from ray.exceptions import RayTaskError

    try:
        yield
    except RayTaskError as err:
        if isinstance(err.cause, NsdsError):
            raise err.cause from None
        raise


def _get(refs: Any) -> Any:
    import ray

    with _task_errors():
        return ray.get(refs)


def _readout_task(path: str, energy: float, compute: Compute) -> tuple[tuple[torch.Tensor, int], float]:
    """W_U's readout complement and k_U, and the seconds spent reading (two Ray objects)."""
    torch.set_num_threads(THREADS)
    with open_source(path) as source:
        read = TimedReader(source)
        return nsds.measure_readout(read, nsds.Layout.of(source), energy, compute), read.seconds


def _layer_task(
    path: str, i: int, params: nsds.NsdsParams, compute: Compute, readout: list[Any]
) -> tuple[int, dict[str, nsds.RawRole], float]:
    """Layer i's raw metrics, and the seconds spent reading. `readout` holds the complement's ObjectRef
    in a list, so Ray starts the task without waiting for it: the detector roles are measured meanwhile."""
    torch.set_num_threads(THREADS)
    with open_source(path) as source:
        layout = nsds.Layout.of(source)
        read = TimedReader(source)
        roles = layout.roles(read, i)
        parts: list[Callable[[], dict[str, nsds.RawRole]]] = [
            lambda: nsds.measure_detectors(roles, layout.geo, params.energy, compute),
            lambda: nsds.measure_writers(roles, layout.geo, _get(readout[0])[0], params.energy, compute),
        ]
        return i, nsds.checked_layer(read, layout, i, parts), read.seconds


def score(model: str, gguf_file: str | None, params: nsds.NsdsParams, compute: Compute, workers: int) -> ScoreReport:
    """nsds.score on the connected Ray cluster: the same report, its layers measured by tasks."""
    import ray

    start = time.perf_counter()
    path = str(resolve(model, gguf_file))
    with open_source(model, gguf_file) as source:  # the header is checked here, before any task starts
        geo = nsds.Layout.of(source).geo
        options = _options(compute)
        readout, readout_s = (
            ray.remote(_readout_task).options(num_returns=2, **options).remote(path, params.energy, compute)
        )
        task = ray.remote(_layer_task).options(**options)
        calls = [lambda i=i: task.remote(path, i, params, compute, [readout]) for i in range(geo.num_layers)]
        stage(f"scoring {geo.num_layers} layers on Ray, {workers} at a time")
        raw: list[dict[str, nsds.RawRole]] = [{}] * geo.num_layers
        read_s = 0.0
        for i, metrics, seconds in progress(as_completed(calls, workers), "scoring layers (Ray)", len(calls), "layer"):
            raw[i], read_s = metrics, read_s + seconds
        complement_and_rank, seconds = _get([readout, readout_s])
        return nsds.score_report(source, geo, params, compute, raw, complement_and_rank[1], read_s + seconds, start)


def as_completed(calls: list[Callable[[], Any]], workers: int) -> Iterator[Any]:
    """Start the calls (each returns an ObjectRef) in order, at most `workers` in flight; yield each
    result as it finishes."""
    import ray

    pending = []
    for call in calls:
        pending.append(call())
        if len(pending) < workers:
            continue
        ready, pending = ray.wait(pending, num_returns=1)
        yield _get(ready[0])
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield _get(ready[0])


class ModelCopy:
    """One worker's copy of the model and the token windows (a Ray actor). It keeps one quantizer's bank at
    a time, as `nsds compare` goes through its quantizers in turn, and measures jobs as the driver does."""

    def __init__(self, path: str, device: str, windows: torch.Tensor, cfg: CompareConfig) -> None:
        torch.set_num_threads(THREADS)
        self.model = load_model(Path(path), device)
        self.windows, self.cfg = windows, cfg
        self.names = [m.name for m in arch.linear_modules(self.model, fuse=cfg.fuse)]
        self.bank: WeightBank | None = None

    def evaluate(self, index: int, quantizer: str | None, job: PerplexityJob) -> tuple[int, float]:
        if self.bank is not None and self.bank.quantizer.name != quantizer:
            self.bank.restore()  # the checkpoint's weights back: a new bank copies them as its pristine ones
            self.bank = None  # and its quantized variants freed before the next bank makes its own
        if quantizer is not None and self.bank is None:
            made = make_quantizer(quantizer, self.cfg.group_size, self.cfg.symmetric)
            self.bank = WeightBank(self.model, self.names, made)
        return index, measure(self.model, self.windows, self.bank, job)


class EvaluationPool:
    """`workers` ModelCopy actors (one CPU, or one GPU, each); a job goes to whichever copy is free."""

    def __init__(self, path: str, windows: torch.Tensor, cfg: CompareConfig, compute: Compute, workers: int) -> None:
        import ray
        from ray.util import ActorPool

        stage(f"loading {workers} copies of the model on Ray ({compute.device})")
        actor = ray.remote(ModelCopy).options(**_options(compute))
        shared = ray.put(windows)
        self.pool = ActorPool([actor.remote(path, compute.device, shared, cfg) for _ in range(workers)])

    def run(self, bank: WeightBank | None, jobs: list[PerplexityJob]) -> Iterator[tuple[int, float]]:
        """As Here.run; the copies build their own bank of `bank`'s quantizer."""
        quantizer = None if bank is None else bank.quantizer.name
        with _task_errors():
            yield from self.pool.map_unordered(
                lambda copy, item: copy.evaluate.remote(item[0], quantizer, item[1]), list(enumerate(jobs))
            )
