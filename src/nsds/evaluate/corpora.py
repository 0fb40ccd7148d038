"""The named evaluation texts (no torch: the command line lists them): cached texts, whole or halved, and
the hub texts that need a network."""

from dataclasses import dataclass

HUB_TEXTS = ("wikitext2", "c4")


@dataclass(frozen=True)
class CachedText:
    """A text from the asset cache, whole or one half of it."""

    asset: str
    half: int | None  # 0: the first half, 1: the second (split at the paragraph break nearest the middle)
    about: str


CACHED_TEXTS = {
    "brown": CachedText("brown", None, "the Brown corpus, offline default"),
    "brown-tune": CachedText("brown", 0, "Brown's first half (genres A-J): nsds's constants are chosen on it"),
    "brown-test": CachedText("brown", 1, "Brown's second half (genres J-R): held out"),
    "moby-dick": CachedText("moby-dick", None, "Moby-Dick: held out, a different text"),
    "lodash": CachedText("lodash", None, "lodash's JavaScript source: held out, code"),
}
TEXT_CHOICES = ", ".join([*CACHED_TEXTS, *HUB_TEXTS])


def half(content: str, which: int) -> str:
    """The first (0) or second (1) half of a text, split at the paragraph break nearest its middle."""
    middle = len(content) // 2
    before, after = content.rfind("\n\n", 0, middle), content.find("\n\n", middle)
    cut = min((c for c in (before, after) if c >= 0), key=lambda c: abs(c - middle), default=middle)
    return content[:cut].strip() + "\n" if which == 0 else content[cut:].strip() + "\n"
