"""The perplexity protocol, stated next to every number it produced."""

from dataclasses import asdict, dataclass
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        """The fields and, for readers of the JSON, the description."""
        return asdict(self) | {"description": self.describe()}
