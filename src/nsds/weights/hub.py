"""Hugging Face Hub ids, resolved to a local folder or file (needs a network or a warm HF cache)."""

from pathlib import Path

from nsds.errors import NsdsError, first_line

_WEIGHT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]


def download(repo_id: str, gguf_file: str | None = None) -> Path:
    """Fetch a repo's config and safetensors (or one GGUF file); returns the local folder or file."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if gguf_file:
            return Path(hf_hub_download(repo_id, gguf_file))
        return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_FILES))
    except Exception as err:  # network, auth and not-found errors all mean the same thing to the user
        reason = first_line(err)
        raise NsdsError(
            f"'{repo_id}' is not a local path and could not be fetched from the Hugging Face Hub ({reason}); "
            "pass a local model folder or GGUF file"
        ) from None
