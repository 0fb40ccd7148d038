"""Evaluation text and its token windows, with the protocol printed next to every number.

Offline default: the Brown corpus from the asset cache (sorted files, windows of 512 tokens, a fixed
token count). Its halves are texts of their own, so constants can be chosen on one and reported on the
other (`brown-tune`, `brown-test`); Moby-Dick is a second, different held-out text (docs/PROTOCOL.md).
Any local text file works the same way. With a network, WikiText-2 and C4 come through
`datasets` with the standard protocols (2048-token windows; C4 as in GPTQ: the first 1100 documents of
the first validation shard, 256 windows).
"""

import importlib.util
from pathlib import Path

import torch

from nsds import assets
from nsds.errors import NsdsError, first_line
from nsds.evaluate.corpora import CACHED_TEXTS, HUB_TEXTS, TEXT_CHOICES, half
from nsds.evaluate.protocol import Protocol

_NEEDS_DATASETS = "'{name}' needs the `datasets` package (pip install datasets) and a network"


def default_window(text: str) -> int:
    return 2048 if text in HUB_TEXTS else 512


def check_window(window: int, tokens: int, max_positions: int | None = None) -> None:
    """Refuse a window that cannot give the asked-for protocol: shorter than 2 tokens (nothing to predict),
    longer than the scored token count allows (one window would score more than `tokens` predictions), or
    longer than the model's context (`max_positions`, when known)."""
    _check_window(window, tokens, max_positions)


def check_protocol(text_name: str, window: int | None, tokens: int) -> int:
    """Check the evaluation options before any model is loaded, and return the window to use (the
    text's default window when `window` is None). A local text must exist and not be binary; it is not
    read in full here."""
    chosen = default_window(text_name) if window is None else window
    _check_window(chosen, tokens, None, default_for=text_name if window is None else None)
    if text_name in HUB_TEXTS:
        if importlib.util.find_spec("datasets") is None:
            raise NsdsError(_NEEDS_DATASETS.format(name=text_name))
    else:
        _sniff(_text_path(text_name))
    return chosen


def _check_window(window: int, tokens: int, max_positions: int | None, default_for: str | None = None) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise NsdsError(f"--tokens must be a positive number of scored tokens, got {tokens!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise NsdsError(f"--window must be at least 2 tokens (a window predicts its tokens 2..n), got {window!r}")
    which = f"the default window for {default_for}, {window} tokens," if default_for else f"a window of {window} tokens"
    if window - 1 > tokens:
        raise NsdsError(
            f"{which} scores {window - 1} tokens, more than --tokens {tokens}; "
            f"raise --tokens to at least {window - 1} or give --window {tokens + 1} or less"
        )
    if max_positions is not None and window > max_positions:
        raise NsdsError(
            f"{which} is longer than the model's context of {max_positions} positions; "
            f"give --window {max_positions} or less"
        )


def _text_path(text: str) -> Path:
    """The file behind a local text name: a cached text or a path to a text file."""
    if text in CACHED_TEXTS:
        return assets.path(CACHED_TEXTS[text].asset)
    path = Path(text).expanduser()
    if path.is_dir():
        raise NsdsError(f"text '{text}' is a folder; give {TEXT_CHOICES} or a path to a text file")
    if not path.is_file():
        raise NsdsError(f"no text '{text}': give {TEXT_CHOICES} or a path to a text file")
    return path


def load_text(text: str) -> str:
    """The raw text named by `text`: a cached text (TEXT_CHOICES), wikitext2, c4, or a path to a UTF-8 text file."""
    if text in HUB_TEXTS:
        return _hub_text(text)
    path = _text_path(text)
    if text in CACHED_TEXTS:
        content = path.read_text(encoding="utf-8")
        chosen = CACHED_TEXTS[text].half
        return content if chosen is None else half(content, chosen)
    _sniff(path)
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise NsdsError(
            f"text file '{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "give a UTF-8 text file"
        ) from None
    except OSError as err:
        raise NsdsError(f"cannot read text file '{path}': {first_line(err)}") from None
    if not content.strip():
        raise NsdsError(f"text file '{path}' is empty")
    _check_is_text(content, path)
    return content


def _sniff(path: Path, size: int = 1 << 16) -> None:
    """Refuse a binary file from its first bytes, before reading all of it (a model file can be GBs)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(size)
    except OSError as err:
        raise NsdsError(f"cannot read text file '{path}': {first_line(err)}") from None
    if b"\0" in head:
        raise NsdsError(
            f"text file '{path}' holds NUL bytes (the first at byte {head.index(0)}): a binary file, not text"
        )


_WHITESPACE = frozenset("\t\n\r\f\v")


def _check_is_text(content: str, path: Path, sample: int = 1 << 20) -> None:
    """Refuse binary data that happens to decode as UTF-8 (NUL bytes, mostly control characters): its
    perplexity would be a meaningless huge number."""
    if "\0" in content:
        offset = content.index("\0")
        raise NsdsError(
            f"text file '{path}' holds NUL bytes (the first at character {offset}): a binary file, not text"
        )
    head = content[:sample]
    odd = sum(1 for ch in head if not ch.isprintable() and ch not in _WHITESPACE)
    if odd > 0.1 * len(head):
        raise NsdsError(
            f"text file '{path}' is {odd / len(head):.0%} non-printable characters: a binary file, not text"
        )


def _hub_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise NsdsError(_NEEDS_DATASETS.format(name=name)) from None
    try:
        if name == "wikitext2":
            return "\n\n".join(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        documents = datasets.load_dataset("allenai/c4", data_files=shard, split="validation")
        return " ".join(documents[:1100]["text"])
    except Exception as err:  # network, hub and cache errors all mean the text cannot be had here
        reason = first_line(err)
        offline = ", ".join(CACHED_TEXTS)
        raise NsdsError(f"cannot get '{name}' from the Hugging Face Hub ({reason}); offline use {offline}") from None


def token_windows(
    tokenizer, text: str, name: str, window: int, tokens: int, *, max_positions: int | None = None
) -> tuple[torch.Tensor, Protocol]:
    """Cut the text's tokens into non-overlapping windows holding about `tokens` scored tokens.

    When the tokenizer adds a BOS token by default (Gemma does; SmolLM2 does not), every window starts
    with it, as the model saw in training; the BOS position itself is not scored. `max_positions`, the
    model's context length when known (nsds.arch.context_length), bounds the window.
    """
    check_window(window, tokens, max_positions)
    bos = tokenizer.bos_token_id
    probe = tokenizer("a").input_ids
    bos_prefix = bos is not None and len(probe) > 0 and probe[0] == bos
    body = window - 1 if bos_prefix else window  # text tokens per window
    count = max(1, tokens // (window - 1))  # each window scores window - 1 predictions
    # Tokenize a generous prefix of a long text rather than all of it (Brown is 6 MB).
    chars = min(len(text), count * body * 16)
    ids = tokenizer(text[:chars], add_special_tokens=False).input_ids
    if len(ids) < count * body and chars < len(text):
        ids = tokenizer(text, add_special_tokens=False).input_ids
    count = min(count, len(ids) // body)
    if count == 0:
        raise NsdsError(f"text '{name}' has {len(ids)} tokens, fewer than one window of {window}; use a longer text")
    windows = torch.tensor(ids[: count * body], dtype=torch.long).reshape(count, body)
    if bos_prefix:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    scored = count * (window - 1)
    return windows, Protocol(name, window, count, scored, bos_prefix)
