"""Evaluation text and its token windows, with the protocol printed next to every number.

Offline default: the Brown corpus from the asset cache (sorted files, windows of 512 tokens, a fixed
token count). Any local text file works the same way. With a network, WikiText-2 and C4 come through
`datasets` with the standard protocols (2048-token windows; C4 as in GPTQ: the first 1100 documents of
the first validation shard, 256 windows).
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nsds import assets
from nsds.errors import NsdsError, first_line

HUB_TEXTS = ("wikitext2", "c4")


@dataclass(frozen=True)
class Protocol:
    text: str
    window: int  # tokens per window, including a BOS prefix when the tokenizer adds one
    windows: int
    scored_tokens: int  # predictions counted in the perplexity
    bos_prefix: bool

    def describe(self) -> str:
        prefix = ", each window starting with BOS" if self.bos_prefix else ""
        return (
            f"{self.text}: {self.windows} non-overlapping windows of {self.window} tokens{prefix}, "
            f"{self.scored_tokens} scored tokens; PPL = exp(mean token NLL)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def default_window(text: str) -> int:
    return 2048 if text in HUB_TEXTS else 512


def load_text(text: str) -> str:
    """The raw text named by `text`: brown, wikitext2, c4, or a path to a UTF-8 text file."""
    if text == "brown":
        return assets.path("brown").read_text(encoding="utf-8")
    if text in HUB_TEXTS:
        return _hub_text(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise NsdsError(f"no text '{text}': give brown, wikitext2, c4 or a path to a text file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise NsdsError(f"cannot read text file '{path}': {err}") from None
    if not content.strip():
        raise NsdsError(f"text file '{path}' is empty")
    return content


def _hub_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise NsdsError(f"'{name}' needs the `datasets` package (pip install datasets) and a network") from None
    try:
        if name == "wikitext2":
            return "\n\n".join(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        documents = datasets.load_dataset("allenai/c4", data_files=shard, split="validation")
        return " ".join(documents[:1100]["text"])
    except Exception as err:  # network, hub and cache errors all mean the text cannot be had here
        reason = first_line(err)
        raise NsdsError(f"cannot get '{name}' from the Hugging Face Hub ({reason}); use --text brown offline") from None


def token_windows(tokenizer, text: str, name: str, window: int, tokens: int) -> tuple[torch.Tensor, Protocol]:
    """Cut the text's tokens into non-overlapping windows holding about `tokens` scored tokens.

    When the tokenizer adds a BOS token by default (Gemma does; SmolLM2 does not), every window starts
    with it, as the model saw in training; the BOS position itself is not scored.
    """
    if window < 2:
        raise NsdsError(f"window must be at least 2 tokens, got {window}")
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
