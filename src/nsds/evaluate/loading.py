"""Loading a model for evaluation: its tokenizer, the token windows every plan is scored on, the model."""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsds import arch
from nsds.compute import Compute
from nsds.errors import NsdsError
from nsds.evaluate.text import Protocol, load_text, token_windows
from nsds.layerwise import LayerwiseModel, pretrained
from nsds.progress import note, stage
from nsds.weights import ModuleSource, WeightSource, open_source


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")


@dataclass
class Loaded:
    """A model ready for evaluation, with its tokenizer and the token windows every plan is scored on."""

    lm: LayerwiseModel  # resident (loaded whole) or read one layer at a time
    tokenizer: Any
    windows: torch.Tensor
    protocol: Protocol
    source: WeightSource  # the model's weights for the scorers: the resident model's, or streamed from its files
    compute: Compute
    seconds: float  # tokenizer + tokenization + model load


def check_whole_model_fits(source: WeightSource, memory: int | None) -> None:
    """A one-line error, before anything is loaded, when the model in float32 (how it is held whole) is larger
    than the device's `memory` in bytes (Compute.memory): the load would fail or swap for hours."""
    if memory is None:
        return
    size = 4 * sum(math.prod(source.shape(name)) for name in source.names())
    if size > memory:
        raise NsdsError(f"holding {source.model_id} whole takes {size / 2**30:.1f} GiB in float32 and the device has "
                        f"{memory / 2**30:.1f} GiB: `nsds run --quantizer gguf` (without --tasks) reads it one layer "
                        "at a time")  # fmt: skip


def load_for_evaluation(model_id: str, gguf_file: str | None, text_name: str, window: int, tokens: int,
                        compute: Compute, resident: bool = True) -> Loaded:  # fmt: skip
    """Read the text, check the architecture and context length from the weights' header (cheap, before the
    long load), then load the tokenizer, cut the token windows and load the model on the compute device:
    whole (`resident`), or only its stem, its layers read as passes reach them (nsds.layerwise). `window` is
    the one text.check_protocol resolved."""
    text = load_text(text_name)
    with open_source(model_id, gguf_file) as source:
        path, files = source.location, source.files
        context = arch.context_length(source.config)
    start = time.perf_counter()
    tokenizer = load_tokenizer(path)
    windows, protocol = token_windows(tokenizer, text, text_name, window, tokens, max_positions=context)
    if protocol.windows < max(1, tokens // (window - 1)):  # the text holds fewer windows than were asked for
        note(f"text '{text_name}' holds {protocol.windows} windows of {window} tokens: {protocol.scored_tokens} "
             f"scored tokens, not the {tokens} asked for")  # fmt: skip
    how = "" if resident else ", one layer at a time"
    stage(f"loading {model_id} ({compute.device}{how})")
    lm = LayerwiseModel(path, torch.float32, compute.device, resident=resident)
    streamed = open_source(model_id, gguf_file) if not lm.resident else ModuleSource(lm.model, model_id, files)
    return Loaded(lm, tokenizer, windows, protocol, streamed, compute, time.perf_counter() - start)
