"""Each module's diagonal Fisher information on text the model writes itself (docs/METHOD.md §9).

No text is read. The model samples `SEQUENCES` continuations of `LENGTH` tokens from its BOS token (temperature
1, no truncation, seeded): with those tokens as labels, the squared gradient of a sequence's log-likelihood is
an unbiased estimate of the sum over its tokens of the diagonal of the Fisher information (the labels are the
model's own samples, so the cross terms between tokens vanish in expectation). Averaged per token, F gives the
second-order estimate of what a small weight change d costs the model's predictions:

    KL(model || changed model) ~ 1/2 sum_i F_ii d_i^2   nats per token,

which the `error` allocator minimises where the quantization noise is small (allocate.least_error).

Who samples: with llama.cpp's types, llama-completion on the model's GGUF file (nsds.selftext, the text the
importance matrix is made of), so the model is never held whole; with the other quantizers, transformers on
the loaded model. The gradients are taken one decoder layer at a time (layerwise_fisher).
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig

from nsds import arch, selftext
from nsds.layerwise import LayerwiseModel, layer_output, sequence_gradients
from nsds.plan import Module
from nsds.progress import progress, stage
from nsds.spill import RowFile

SEQUENCES = 16
LENGTH = selftext.LENGTH
SEED = 0


def settings(lm: LayerwiseModel, base: Path | None) -> dict[str, object]:
    """What the estimate depends on besides the weights: who sampled the text (llama.cpp on `base`, or
    transformers, whose sampling differs across devices and torch versions) and the precision of the pass."""
    sampler = {"llama.cpp": selftext.settings(SEQUENCES)} if base is not None else {"transformers": SEED}
    return {"sequences": SEQUENCES, "length": LENGTH, "sampler": sampler, "device": str(lm.device),
            "dtype": str(lm.dtype), "torch": torch.__version__}  # fmt: skip


def own_tokens(lm: LayerwiseModel, tokenizer, base: Path | None) -> torch.Tensor:
    """SEQUENCES x (1 + LENGTH) token ids of the model's own text (cut to its context): sampled by
    llama-completion from `base` (nsds.selftext) and tokenized, or, without `base`, by transformers from the
    model, which must then be resident."""
    bos = next((t for t in (tokenizer.bos_token_id, lm.model.config.bos_token_id, tokenizer.eos_token_id)
                if isinstance(t, int)), 0)  # fmt: skip
    context = arch.context_length(lm.model.config)
    length = min(LENGTH, context - 1) if context else LENGTH
    if base is not None:
        return selftext.token_sequences(tokenizer, selftext.sample(base, SEQUENCES), bos, length)
    if not lm.resident:
        raise RuntimeError("transformers samples from a resident model only")
    stage("the model writes its own text (transformers)")
    return self_text(lm.model, bos, SEQUENCES, length)


def self_text(model: torch.nn.Module, bos: int, sequences: int = SEQUENCES, length: int = LENGTH,
              seed: int = SEED) -> torch.Tensor:  # fmt: skip
    """`sequences` x (1 + length) token ids the model sampled itself after `bos`: plain sampling (temperature 1,
    no top-k/top-p, none of the checkpoint's generation settings), end-of-text suppressed so every sequence
    has `length` tokens (cut to the model's context), seeded without touching the caller's random state."""
    context = arch.context_length(model.config)
    length = min(length, context - 1) if context else length
    device = next(model.parameters()).device
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                                min_new_tokens=length, pad_token_id=bos,
                                eos_token_id=model.config.eos_token_id)  # fmt: skip
    prompt = torch.full((sequences, 1), bos, dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)


def layerwise_fisher(lm: LayerwiseModel, modules: Sequence[Module], tokens: torch.Tensor, folder: Path,
                     each_layer: Callable[[int, dict[str, torch.Tensor]], None]) -> None:  # fmt: skip
    """diagonal_fisher of `lm`, one decoder layer at a time: `each_layer(i, F)` is called, from the last
    layer down, with F for layer i's modules while that layer is loaded (its weights readable in lm.model),
    and F is dropped after. The inputs of every layer of the forward pass wait in a file in `folder` (the
    sequences' hidden states, in the model's dtype: nsds.spill); the backward pass runs each layer again on them
    with the gradient the layer above handed down. Memory: the stem, one layer, its float32 sums and the
    sequences' hidden states, whatever the depth."""
    by_layer: dict[int, list[Module]] = {}
    for m in modules:
        by_layer.setdefault(m.layer, []).append(m)
    sequences, length = tokens.shape
    hidden = lm.model.config.get_text_config().hidden_size
    inputs = RowFile(folder / "fisher-inputs.bin", lm.num_layers * sequences, (length, hidden), lm.dtype)
    try:

        def keep(i: int, j: int, state: torch.Tensor) -> None:
            inputs.write(i * sequences + j, state[0])

        finals, calls = lm.forward_pass(tokens, keep_inputs=keep, desc="Fisher information: forward")
        gradients = sequence_gradients(lm, tokens, finals)
        del finals
        for i in progress(range(lm.num_layers - 1, -1, -1), desc="Fisher information: backward", unit="layer"):
            with lm.layer(i) as layer:
                parameters = dict(lm.model.named_parameters())
                planned = by_layer.get(i, [])
                owner = {m.name: _owner(lm.model, m.name, parameters) for m in planned}
                wanted = list(dict.fromkeys(owner.values()))
                squares = {name: torch.zeros_like(parameters[name], dtype=torch.float32) for name in wanted}
                for name in wanted:
                    parameters[name].requires_grad_(True)
                with torch.enable_grad():
                    for j in range(sequences):
                        state = inputs.read(i * sequences + j)[None].to(lm.device).requires_grad_(True)
                        args, kwargs = calls[j][i]
                        torch.autograd.backward(layer_output(layer(state, *args, **kwargs)), gradients[j])
                        for name in wanted:
                            squares[name] += parameters[name].grad.float().square()
                            parameters[name].grad = None
                        gradients[j] = state.grad
                for name in wanted:
                    parameters[name].requires_grad_(False)
                    squares[name] /= sequences * (length - 1)
                each_layer(i, {m.name: _slice(lm.model, m.name, parameters[owner[m.name]], squares[owner[m.name]]).cpu()
                               for m in planned})  # fmt: skip
    finally:
        inputs.close()


def _owner(model: torch.nn.Module, name: str, parameters: dict[str, torch.nn.Parameter]) -> str:
    """The name of the parameter that holds a module's weight (its own, or a fused experts parameter it is a
    slice of)."""
    view, _ = arch.module_weight(model, name)
    base = view if view._base is None else view._base
    return next(key for key, p in parameters.items() if p is base or p.data_ptr() == base.data_ptr())


def _slice(model: torch.nn.Module, name: str, parameter: torch.nn.Parameter, squares: torch.Tensor) -> torch.Tensor:
    """The module's part of its parameter's squared gradients, read exactly as its weight is read (out x in):
    the parameter briefly holds the squares, so arch.module_weight's own slicing applies."""
    data = parameter.data
    parameter.data = squares
    try:
        view, transposed = arch.module_weight(model, name)
        view = view.detach()  # a view of `squares` (float32): no copy
    finally:
        parameter.data = data
    return view.T if transposed else view
