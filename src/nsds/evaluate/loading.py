"""Loading a model for evaluation: its tokenizer, the token windows every plan is scored on, the model."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsds import arch
from nsds.compute import Compute
from nsds.errors import NsdsError, first_line
from nsds.evaluate.text import Protocol, load_text, token_windows
from nsds.progress import note, stage
from nsds.weights import ModuleSource, open_source


def _pretrained(loader, path: Path, what: str):
    """transformers' from_pretrained on a folder or a GGUF file, with its errors as one line."""
    folder, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    try:
        return loader(folder, **extra)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NsdsError(f"transformers cannot load the {what} in '{path}': {first_line(err)}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return _pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")


def load_model(path: Path, device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model in `dtype` (a GGUF file is dequantized)."""
    from transformers import AutoModelForCausalLM

    def loader(folder, **extra):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)

    return _pretrained(loader, path, "model").eval().to(device)


@dataclass
class Loaded:
    """A model loaded once for evaluation, with its tokenizer and the token windows every plan is scored on."""

    model: torch.nn.Module
    tokenizer: Any
    windows: torch.Tensor
    protocol: Protocol
    source: ModuleSource  # the loaded model's weights, with the files they came from
    compute: Compute
    seconds: float  # tokenizer + tokenization + model load


def load_for_evaluation(model_id: str, gguf_file: str | None, text_name: str, window: int, tokens: int,
                        compute: Compute) -> Loaded:  # fmt: skip
    """Read the text, check the architecture and context length from the weights' header (cheap, before the
    long load), then load the tokenizer, cut the token windows and load the model on the compute device.
    `window` is the one text.check_protocol resolved."""
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
    stage(f"loading {model_id} ({compute.device})")
    model = load_model(path, compute.device)
    seconds = time.perf_counter() - start
    return Loaded(model, tokenizer, windows, protocol, ModuleSource(model, model_id, files), compute, seconds)
