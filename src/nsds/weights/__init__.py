"""Weight sources: open a model given as a folder, a GGUF file, a cached asset name or a hub id."""

import re
from pathlib import Path

from nsds import assets
from nsds.errors import NsdsError
from nsds.weights.base import WeightSource, weights_identity
from nsds.weights.gguf import GGUFSource
from nsds.weights.module import ModuleSource
from nsds.weights.safetensors import SafetensorsSource

__all__ = [
    "GGUFSource",
    "ModuleSource",
    "SafetensorsSource",
    "WeightSource",
    "open_source",
    "resolve",
    "weights_identity",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(model: str, gguf_file: str | None = None) -> Path:
    """The local folder or GGUF file that `model` names (a path, an nsds asset name, or a hub id)."""
    path = Path(model).expanduser()
    if path.exists():
        if gguf_file and not path.is_dir():
            raise NsdsError(
                f"--gguf-file picks a file inside a model folder or hub repo, but '{model}' is already a file; "
                "drop --gguf-file"
            )
        if gguf_file:
            path = path / gguf_file
            if not path.is_file():
                raise NsdsError(f"no GGUF file '{gguf_file}' in '{model}'")
        return path
    if model in assets.MODELS:
        if gguf_file:
            raise NsdsError(
                f"--gguf-file picks a file inside a model folder or hub repo, but '{model}' is an nsds asset "
                f"(one GGUF file, {assets.MODELS[model].file}); drop --gguf-file"
            )
        return assets.path(model)
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        from nsds.weights.hub import download

        return download(model, gguf_file)
    raise NsdsError(f"'{model}' does not exist (expected a model folder, a .gguf file, an nsds asset or a hub id)")


def open_source(model: str, gguf_file: str | None = None) -> WeightSource:
    """Open the weights `model` names as a streaming source."""
    path = resolve(model, gguf_file)
    if path.is_file():
        if path.suffix != ".gguf":
            raise NsdsError(f"'{path}' is not a .gguf file or a model folder")
        return GGUFSource(path, model_id=model)
    if (path / "config.json").exists() or any(path.glob("*.safetensors")):
        return SafetensorsSource(path, model_id=model)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFSource(ggufs[0], model_id=model)
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise NsdsError(f"'{path}' holds several GGUF files ({names}); choose one with --gguf-file")
    raise NsdsError(f"'{path}' is not a model folder: no config.json with safetensors and no .gguf file")
