"""The model's own text: sequences llama-completion samples from the model's GGUF file, kept in the nsds cache.

Each sequence starts from the BOS token and is sampled plainly (temperature 1 over the whole vocabulary, no
top-k/top-p/min-p, no repetition penalty, end of text suppressed, one seed per sequence), so it is what the
model itself expects to read. No text is read: the importance matrix (nsds.importance) and the Fisher
information of runs with llama.cpp's types (nsds.fisher) are measured on this text (docs/GGUF.md §5).
llama-completion runs memory-mapped on the file, so sampling costs no more memory than llama.cpp's runtime.
"""

import json
from pathlib import Path

import torch

from nsds import gguf_tools, llamacpp
from nsds.errors import NsdsError, first_line
from nsds.files import keyed_cache_path, read_document, sha256_file, write_bytes, write_cache
from nsds.gguf_header import GGUFHeader
from nsds.progress import note, stage

SCHEMA = "nsds.selftext/1"
LENGTH = 512  # tokens per sequence (llama-imatrix's chunk, the Fisher step's sequence)
SLACK = 16  # each sequence is sampled this much longer: its text may tokenize back to a few tokens fewer
SEED = 0  # sequence i is sampled with seed SEED + i, so a larger sample extends a smaller one

# llama-completion's sampling: only the temperature sampler, then the seeded draw; no chat template; the text
# printed is what it sampled.
_SAMPLING = ("--samplers", "temperature", "--temp", "1", "--ignore-eos", "-no-cnv", "--no-warmup", "--simple-io")


def settings(sequences: int) -> dict[str, object]:
    """What a sample depends on besides the model file: its size, the sampling and the llama.cpp build."""
    return {"sequences": sequences, "length": LENGTH, "slack": SLACK, "seed": SEED,
            "llama.cpp": llamacpp.tools().version, "sampling": list(_SAMPLING)}  # fmt: skip


def sample(base: Path, sequences: int) -> list[str]:
    """`sequences` texts of LENGTH + SLACK tokens that the model in `base` (a GGUF file) wrote itself, from the
    nsds cache when it wrote them before (keyed by the file's SHA-256 and the settings)."""
    key = {"model": sha256_file(base), **settings(sequences)}
    path = keyed_cache_path("selftext", key)
    if path.is_file():
        try:
            texts = read_document(path, SCHEMA, "cached own text", lambda data: _texts(data, key))
            stage(f"the model's own text: from the nsds cache ({path.name})")
            return texts
        except NsdsError as err:  # a damaged entry is only lost work
            note(f"{first_line(err)}; sampling the model's own text again")
    stage(f"the model writes {sequences} x {LENGTH + SLACK} tokens of its own text (llama-completion)")
    prompt = start_prompt(GGUFHeader(base))
    texts = [gguf_tools.generate(base, prompt, LENGTH + SLACK, SEED + i, _SAMPLING) for i in range(sequences)]
    write_cache(path, {"schema": SCHEMA, "key": key, "texts": texts}, "own-text cache")
    return texts


def _texts(data: dict, key: dict) -> list[str]:
    texts = data["texts"]
    if data["key"] != json.loads(json.dumps(key)) or not all(isinstance(t, str) for t in texts):
        raise NsdsError("the cached own text was made with other settings")
    return texts


def text_file(base: Path, sequences: int, target: Path) -> Path:
    """The sample as one text file at `target` (the sequences one per line), as llama-imatrix reads it."""
    write_bytes(target, "\n".join(sample(base, sequences)).encode("utf-8"))
    return target


def start_prompt(header: GGUFHeader) -> str:
    """What llama-completion starts from: nothing where the vocabulary adds its BOS token itself, else the
    text of the BOS token (the EOS token where there is none), which it parses back to that token."""
    if header.metadata.get("tokenizer.ggml.add_bos_token") is True:
        return ""
    start = header.metadata.get("tokenizer.ggml.bos_token_id", header.metadata.get("tokenizer.ggml.eos_token_id"))
    if not isinstance(start, int):
        raise NsdsError("the model's vocabulary names no BOS or EOS token to start its own text from")
    return header.string_item("tokenizer.ggml.tokens", start)


def token_sequences(tokenizer, texts: list[str], bos: int, length: int = LENGTH) -> torch.Tensor:
    """The texts as rows of 1 + `length` token ids (`bos`, then each text's first `length` tokens); when a
    text tokenizes to fewer, every row is cut to the shortest (said in a note)."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    shortest = min(len(row) for row in ids)
    if shortest < length:
        note(f"the model's own text tokenizes to {shortest} tokens in one sequence: every sequence is cut to it")
        length = shortest
    if length < 1:
        raise NsdsError("the model's own text is empty: its sampling or its tokenizer is broken")
    return torch.tensor([[bos, *row[:length]] for row in ids], dtype=torch.long)
