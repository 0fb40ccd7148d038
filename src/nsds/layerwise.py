"""A causal LM run one decoder layer at a time, its weights read from the weight source (docs/DESIGN.md §Memory).

Only the stem (token embedding, final norm, output head, rotary tables) stays in memory. A pass over token
sequences runs every sequence through layer 0, then layer 1, ..., holding one layer's weights and each
sequence's hidden state, so its peak is the stem, the largest layer and the hidden states, whatever the
depth. The computation is the model's own: transformers runs its forward as always (embedding, masks,
position embeddings, final norm, head and any logit soft-capping) with every decoder layer replaced by a
relay, which records the arguments the model passes each layer, or hands back a hidden state computed here
with the real layer on those same arguments. A pass therefore gives the same numbers as the whole model.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from nsds import arch
from nsds.errors import NsdsError, first_line
from nsds.progress import note, progress
from nsds.weights.safetensors import SafetensorsSource

# What a pass may do to a layer once its checkpoint weights are in: (layer index, the model) -> None.
LayerHook = Callable[[int, torch.nn.Module], None]


def pretrained(loader, path: Path, what: str):
    """transformers' from_pretrained on a folder or a GGUF file, with its errors as one line."""
    folder, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    try:
        return loader(folder, **extra)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NsdsError(f"transformers cannot load the {what} in '{path}': {first_line(err)}") from None


def load_model(path: Path, device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model in `dtype` (a GGUF file is dequantized)."""
    from transformers import AutoModelForCausalLM

    def loader(folder, **extra):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)

    return pretrained(loader, path, "model").eval().to(device)


class _Tensors(Protocol):
    def names(self) -> set[str]: ...

    def tensor(self, name: str) -> torch.Tensor: ...


class _GGUFTensors:
    """A GGUF file's tensors under the names of `model` (built from the file's config), each dequantized and
    processed (Llama's q/k permutation undone, Gemma's norms shifted back) by transformers' own GGUF code."""

    def __init__(self, path: Path, model: torch.nn.Module) -> None:
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.reader = gguf.GGUFReader(path)
        self.parsed: dict[str, Any] = load_gguf_checkpoint(path, return_tensors=False)
        architecture = str(self.reader.fields["general.architecture"].contents())
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self.parsed["config"])
        self.mapping: dict[str, str] = get_gguf_hf_weights_map(model, self.processor)  # GGUF name -> HF name
        by_name = {tensor.name: tensor for tensor in self.reader.tensors}
        self.entries = {hf: by_name[name] for name, hf in self.mapping.items() if name in by_name}

    def names(self) -> set[str]:
        return set(self.entries)

    def tensor(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        entry = self.entries[name]
        weights = dequantize(entry.data, entry.tensor_type)
        processed = self.processor.process(weights=weights, name=entry.name, tensor_key_mapping=self.mapping,
                                           parsed_parameters=self.parsed)  # fmt: skip
        return torch.from_numpy(np.copy(processed.weights))


class _Relayed(Exception):
    """Raised by the last relay of a capture: the model's forward is stopped before its norm and head."""


class LayerwiseModel:
    """The transformers model of the checkpoint at `location` (a model folder or a GGUF file), built without
    weights; its stem is loaded at once, its decoder layers when a pass reaches them (in `dtype`, on `device`).
    Its config and weights are what transformers' from_pretrained reads (a GGUF file: one tensor at a time,
    dequantized and processed as transformers processes it). `resident`: loaded whole by from_pretrained
    instead (what sampling with transformers and lm-eval need); so is a checkpoint whose tensors transformers
    converts on load. Passes over a resident model run the same way and leave its weights as they were."""

    def __init__(self, location: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 resident: bool = False) -> None:  # fmt: skip
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dtype, self.device = dtype, device
        is_gguf = location.is_file()
        config = pretrained(AutoConfig.from_pretrained, location, "config")
        family = arch.family_of(config.model_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.tensors: _Tensors = _GGUFTensors(location, model) if is_gguf else SafetensorsSource(location)
        available = self.tensors.names()
        missing = [name for name, _ in model.named_parameters() if name not in available]
        self.resident = resident or bool(missing)
        if missing and not resident:  # e.g. experts transformers fuses on load: its loader alone knows how
            note(
                f"transformers' {type(model).__name__} has no tensor '{missing[0]}' in the checkpoint (it converts "
                "the checkpoint's tensors when it loads them): the whole model is loaded, not one layer at a time"
            )
        if self.resident:
            model = load_model(location, device, dtype)
        self.model = model.eval()
        self.body = arch.find_body(family, {name for name, _ in model.named_parameters()})
        container = f"{self.body}{family.layers}"
        self.layers: torch.nn.ModuleList = model.get_submodule(container)
        self.prefix = f"{container}."
        if not self.resident:
            parent, _, attribute = container.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, attribute, torch.nn.ModuleList())  # the stem alone is materialised
            try:
                self._materialise(model, "")
            finally:
                setattr(owner, attribute, self.layers)
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    def _materialise(self, module: torch.nn.Module, prefix: str) -> None:
        """Allocate `module` (named `prefix` in the model) on the device and fill it: parameters from the
        source, the buffers transformers computes (rotary tables, embedding scales) as transformers does."""
        holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # a tied parameter's every holder
        for sub in module.modules():
            for key, parameter in sub._parameters.items():
                if parameter is not None:
                    holders.setdefault(id(parameter), []).append((sub, key))
        module.to_empty(device=self.device)  # unties: each holder gets its own tensor
        for (first, key), *others in holders.values():
            for sub, other in others:
                setattr(sub, other, getattr(first, key))
        for sub in module.modules():
            if sub._non_persistent_buffers_set:
                self.model._init_weights(sub)
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter.copy_(self.tensors.tensor(prefix + name))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @contextmanager
    def layer(self, i: int) -> Iterator[torch.nn.Module]:
        """Decoder layer i with its checkpoint weights, released (back to no storage) on exit; a resident
        model's layer as it is (the caller restores what it changed)."""
        layer = self.layers[i]
        if self.resident:
            yield layer
            return
        self._materialise(layer, f"{self.prefix}{i}.")
        try:
            yield layer
        finally:
            layer.to("meta")

    # ------------------------------------------------------------------------------------------ relays

    @contextmanager
    def _relays(self, forward: Callable[[int, torch.Tensor, tuple, dict], torch.Tensor]) -> Iterator[None]:
        for i, layer in enumerate(self.layers):
            layer.forward = _relay(forward, i)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    def capture(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """For one sequence (1 x n ids): the hidden state the model feeds layer 0, and the other arguments it
        passes each layer (masks, position embeddings), exactly as its own forward makes them."""
        calls: list[tuple[tuple, dict]] = []
        entry: list[torch.Tensor] = []

        def record(i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            if i == 0:
                entry.append(hidden)
            calls.append((args, kwargs))
            if i == self.num_layers - 1:
                raise _Relayed
            return hidden

        with self._relays(record), torch.no_grad(), suppress(_Relayed):
            self.model(input_ids=ids.to(self.device), use_cache=False)
        return entry[0], calls

    def logits(self, ids: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The model's logits (1 x n x vocabulary) for `ids` when its last layer outputs `final`: the model's
        own norm, head and soft-capping (differentiable in `final`)."""

        def hand_back(i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            return final if i == self.num_layers - 1 else hidden

        with self._relays(hand_back):
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    # ------------------------------------------------------------------------------------------ passes

    def forward_pass(self, sequences: torch.Tensor, prepare: LayerHook | None = None,
                     keep_inputs: Callable[[int, int, torch.Tensor], None] | None = None,
                     desc: str = "layers") -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:  # fmt: skip
        """Every sequence (rows of `sequences`) through every layer: the last layer's outputs and each
        sequence's per-layer arguments. `prepare` changes a layer after its weights are loaded (a plan's
        formats); `keep_inputs(layer, sequence, hidden)` sees every layer's input."""
        states, calls = [], []
        for row in sequences:
            hidden, arguments = self.capture(row.unsqueeze(0))
            states.append(hidden)
            calls.append(arguments)
        with torch.no_grad():
            for i in progress(range(self.num_layers), desc=desc, unit="layer"):
                with self.layer(i) as layer:
                    kept = {k: v.clone() for k, v in layer.state_dict().items()} if prepare and self.resident else None
                    try:
                        if prepare is not None:
                            prepare(i, self.model)
                        for j, hidden in enumerate(states):
                            if keep_inputs is not None:
                                keep_inputs(i, j, hidden)
                            args, kwargs = calls[j][i]
                            states[j] = layer_output(layer(hidden, *args, **kwargs))
                    finally:
                        if kept is not None:
                            layer.load_state_dict(kept)
        return states, calls

    def log_probs(self, windows: torch.Tensor, prepare: LayerHook | None = None,
                  desc: str = "layers") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(window ids, float32 log-probabilities of positions 0..n-2 on the CPU) for each window, as
        evaluate.divergence reads a whole model's, after a layer-by-layer pass (`prepare`: see forward_pass)."""
        finals, _ = self.forward_pass(windows, prepare, desc=desc)
        with torch.no_grad():
            for window, final in zip(windows, finals, strict=True):
                logits = self.logits(window.unsqueeze(0), final)[0, :-1].float()
                yield window, F.log_softmax(logits, dim=-1).cpu()


def _relay(forward: Callable[[int, torch.Tensor, tuple, dict], torch.Tensor], i: int) -> Callable[..., torch.Tensor]:
    """Layer i's forward replaced by `forward(i, hidden, args, kwargs)`."""
    return lambda hidden, *args, **kwargs: forward(i, hidden, args, kwargs)


def layer_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """A decoder layer's hidden state (older layers return a tuple led by it)."""
    return output[0] if isinstance(output, tuple) else output


def sequence_gradients(lm: LayerwiseModel, sequences: torch.Tensor,
                       finals: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # fmt: skip
    """For each sequence, the gradient of its log-likelihood's negative (the summed next-token cross
    entropy of its own tokens) with respect to the last layer's output."""
    gradients = []
    for row, final in zip(sequences, finals, strict=True):
        leaf = final.detach().requires_grad_(True)
        ids = row.unsqueeze(0)
        logits = lm.logits(ids, leaf)[0, :-1].float()
        F.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum").backward()
        gradients.append(leaf.grad)
    return gradients
