"""llama.cpp's command-line tools (llama-quantize, llama-perplexity, llama-imatrix, llama-completion) and its
HF -> GGUF converter.

Two sources, in this order:

- `NSDS_LLAMA_CPP`: a folder holding the user's own build of those tools (or a build folder with them under
  `bin/`); a `convert_hf_to_gguf.py` beside it or one folder up is used too.
- the nsds cache: `nsds assets fetch llama.cpp` downloads the pinned llama-cpp-python sdist from PyPI
  (checksum-verified), extracts its vendored llama.cpp source tree and builds just those tools with
  cmake, statically linked, into `<cache>/tools/llama.cpp-<version>/`, beside the converter script and its
  `gguf-py` and `conversion` packages. A JSON stamp written last marks a finished build: anything without
  a valid stamp (an interrupted build, a changed binary) is rebuilt, in a temporary folder renamed into
  place, so readers never see half a build.
"""

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import gguf

from nsds.errors import NsdsError, first_line
from nsds.files import atomic_write, cache_dir, check_digest, download, sha256_file, staged, verified, write_json
from nsds.gguf_header import GGUFHeader
from nsds.progress import note

ENV_VAR = "NSDS_LLAMA_CPP"
BINARIES = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-completion")
TOOL_NAMES = "llama-quantize, llama-perplexity, llama-imatrix and llama-completion"
# ggml's type table, quantizers and dequantizers as one shared library (ctypes: nsds.ggml): the exact numerics
# llama-quantize writes, for fake-quantizing in process. A user's shared build has them in libggml-base.so.
GGML_LIBRARY = "libggml-quants.so"
GGML_LIBRARY_NAMES = (GGML_LIBRARY, "libggml-base.so")
CONVERT_SCRIPT = "convert_hf_to_gguf.py"
STAMP = "nsds-build.json"
STAMP_SCHEMA = "nsds.llama-cpp-build/1"
INSTALL_HINT = "`apt-get install cmake g++` (Debian/Ubuntu) or your system's cmake and C++ compiler"


@dataclass(frozen=True)
class LlamaCppAsset:
    """llama.cpp's source, vendored in a llama-cpp-python sdist on PyPI; install() builds it."""

    version: str  # llama-cpp-python's version, which pins the vendored llama.cpp commit
    sdist: str
    sha256: str
    url: str
    source_prefix: str  # the llama.cpp tree inside the sdist
    build_minutes_2_cores: float  # measured on an idle 2-core machine (3.8 min); shown before building
    about: str


LLAMA_CPP = LlamaCppAsset(
    version="0.3.36",
    sdist="llama_cpp_python-0.3.36.tar.gz",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    "llama_cpp_python-0.3.36.tar.gz",
    source_prefix="llama_cpp_python-0.3.36/vendor/llama.cpp",
    build_minutes_2_cores=4,
    about="llama.cpp tools (llama-quantize, llama-perplexity, llama-imatrix, llama-completion) built from "
    "llama-cpp-python 0.3.36's sdist, MIT",
)

# Portable: GGML_NATIVE=OFF still enables AVX/AVX2/FMA/F16C on x86-64 (not AVX-512/AMX), so a cache that moves
# to another machine keeps working (a -march=native build even died of SIGILL on the 2-core VM it was built on,
# which advertises AMX); static libraries, so the binaries need nothing from the build folder (ldd: libc,
# libstdc++, libgomp only).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",  # ggml-base's archive is linked into GGML_LIBRARY too
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS model downloads: these tools read local files
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
# Source changes applied before building, each (file, text, replacement), stamped with the build. llama.cpp's
# logger is a thread main() does not wait for (common/log.cpp leaks it on purpose), so a busy machine can lose
# llama-perplexity's last lines (its scores and final estimate); pausing it before returning flushes it.
PATCHES = (
    (
        "tools/perplexity/perplexity.cpp",
        "    llama_backend_free();\n\n    return 0;\n}",
        "    llama_backend_free();\n\n    common_log_pause(common_log_main()); // nsds: print every queued log line\n\n"
        "    return 0;\n}",
    ),
)
# Parts of the source tree the build and the converter never read (documentation, vocab test files).
_SKIP_TOP = frozenset({"docs", "media", ".github", ".devops", ".git"})
# What the GGUF export needs besides the binaries (models/templates: chat templates some converters read).
_CONVERTER_PARTS = (CONVERT_SCRIPT, "conversion", "gguf-py", "models/templates", "LICENSE", "licenses")


@dataclass(frozen=True)
class LlamaCpp:
    """Paths to working llama.cpp tools and where they came from."""

    quantize: Path
    perplexity: Path
    imatrix: Path
    completion: Path
    convert_script: Path | None
    source: Literal["env", "cache"]
    version: str
    ggml_library: Path | None = None  # ggml's quantizers (GGML_LIBRARY_NAMES), when the build has them


def install_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "tools" / f"llama.cpp-{LLAMA_CPP.version}"


def build_minutes(cores: int | None = None) -> int:
    """The build's expected wall time, from the measured minutes on 2 cores, scaled by the cores used."""
    cores = cores or _cores()
    return max(1, round(LLAMA_CPP.build_minutes_2_cores * 2 / min(max(cores, 1), 16)))


def tools() -> LlamaCpp:
    """llama.cpp's tools from NSDS_LLAMA_CPP or the cache, each checked to start; a clear error when there are
    none or one does not run."""
    folder = os.environ.get(ENV_VAR)
    if folder:
        found = _from_env(Path(folder).expanduser())
    else:
        found = installed()
        if found is None:
            raise NsdsError(
                f"llama.cpp's tools are not built: run `nsds assets fetch llama.cpp` (about {build_minutes()} "
                f"minutes) or set {ENV_VAR} to a folder with {TOOL_NAMES}"
            )
    for binary in (found.quantize, found.perplexity, found.imatrix, found.completion):
        check_runs(binary, binary.name)  # each starts: a broken one is refused before any work, not after
    return found


def installed(root: Path | None = None) -> LlamaCpp | None:
    """The cached build when its stamp is valid (this version, these flags, binaries unchanged), else None."""
    folder = install_dir(root)
    try:
        stamp = json.loads((folder / STAMP).read_text())
        valid = (
            stamp["schema"] == STAMP_SCHEMA
            and stamp["version"] == LLAMA_CPP.version
            and stamp["sdist_sha256"] == LLAMA_CPP.sha256
            and stamp["cmake_flags"] == list(CMAKE_FLAGS)
            and stamp["patches"] == [list(patch) for patch in PATCHES]
            and set(stamp["binaries"]) == set(BINARIES)
            and all(sha256_file(folder / "bin" / name) == digest for name, digest in stamp["binaries"].items())
            and stamp["ggml_library"] == sha256_file(folder / "lib" / GGML_LIBRARY)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not valid:
        return None
    script = folder / CONVERT_SCRIPT
    return LlamaCpp(
        quantize=folder / "bin" / "llama-quantize",
        perplexity=folder / "bin" / "llama-perplexity",
        imatrix=folder / "bin" / "llama-imatrix",
        completion=folder / "bin" / "llama-completion",
        convert_script=script if script.is_file() else None,
        source="cache",
        version=LLAMA_CPP.version,
        ggml_library=folder / "lib" / GGML_LIBRARY,
    )


def write_stamp(folder: Path, seconds: float | None = None) -> None:
    """Mark `folder` as a finished build of the pinned version: written last, checked by installed()."""
    write_json(
        folder / STAMP,
        {
            "schema": STAMP_SCHEMA,
            "version": LLAMA_CPP.version,
            "sdist_sha256": LLAMA_CPP.sha256,
            "cmake_flags": list(CMAKE_FLAGS),
            "patches": [list(patch) for patch in PATCHES],
            "binaries": {name: sha256_file(folder / "bin" / name) for name in BINARIES},
            "ggml_library": sha256_file(folder / "lib" / GGML_LIBRARY),
            "build_seconds": None if seconds is None else round(seconds, 1),
        },
    )


def _from_env(folder: Path) -> LlamaCpp:
    for candidate in (folder, folder / "bin"):
        if all((candidate / name).is_file() for name in BINARIES):
            bin_dir = candidate
            break
    else:
        raise NsdsError(
            f"{ENV_VAR}='{folder}' holds no {TOOL_NAMES} (looked in '{folder}' and "
            f"'{folder / 'bin'}'); point it at a llama.cpp build folder, or unset it and run "
            "`nsds assets fetch llama.cpp`"
        )
    scripts = [d / CONVERT_SCRIPT for d in dict.fromkeys((bin_dir, folder, folder.parent, bin_dir.parent.parent))]
    libraries = [d / name for d in dict.fromkeys((bin_dir, folder, folder / "lib")) for name in GGML_LIBRARY_NAMES]
    return LlamaCpp(
        quantize=bin_dir / "llama-quantize",
        perplexity=bin_dir / "llama-perplexity",
        imatrix=bin_dir / "llama-imatrix",
        completion=bin_dir / "llama-completion",
        convert_script=next((s for s in scripts if s.is_file()), None),
        source="env",
        version=_reported_version(bin_dir / "llama-perplexity"),
        ggml_library=next((lib for lib in libraries if lib.is_file()), None),
    )


def _reported_version(binary: Path) -> str:
    """What `llama-perplexity --version` reports ("4242 (abc1234)", "0.5.0-dev (build 0, commit unknown)")."""
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, errors="replace", timeout=20,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"^version: (.+)$", result.stdout + result.stderr, re.M)
    return match.group(1).strip() if match else "unknown"


_CHECKED: set[tuple[str, int, int]] = set()


def check_runs(binary: Path, what: str) -> None:
    """`binary --help` must start and exit 0 or 1 (llama-quantize's usage exits 1): one line if it cannot."""
    try:
        stat = binary.stat()
    except OSError as err:
        raise NsdsError(f"{what} '{binary}' cannot be read: {first_line(err)}") from None
    key = (str(binary), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return
    try:
        result = subprocess.run(
            [str(binary), "--help"], capture_output=True, text=True, errors="replace", timeout=30,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise NsdsError(f"{what} '{binary}' does not run: `--help` did not finish in 30 s") from None
    except OSError as err:
        raise NsdsError(f"{what} '{binary}' does not run: {first_line(err)}") from None
    if result.returncode not in (0, 1):
        raise NsdsError(f"{what} '{binary}' does not run: {_failure(result)}")
    _CHECKED.add(key)


def run_tool(path: Path, args: list[str], what: str, timeout: float | None = None) -> str:
    """Run a tool with its output captured; return stdout followed by stderr (llama.cpp logs to stderr).

    A failure is one NsdsError line naming `what` and the tool's last meaningful error line.
    """
    result = _run_streams(path, args, what, timeout)
    return result.stdout + result.stderr


_ERROR_WORDS = re.compile(r"error|failed|fail to|cannot|can't|unable|invalid|not found|no such|unknown", re.I)


def _failure(result: subprocess.CompletedProcess) -> str:
    """The reason a tool failed, one line: its last error line, else its last output line, with the status."""
    if result.returncode < 0:
        try:
            status = f"killed by {signal.Signals(-result.returncode).name}"
        except ValueError:
            status = f"killed by signal {-result.returncode}"
    else:
        status = f"exit status {result.returncode}"
    reason = _meaningful_line(result.stderr) or _meaningful_line(result.stdout)
    return f"{reason} ({status})" if reason else status


def _meaningful_line(text: str) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines()]
    lines = [line for line in lines if re.search(r"[A-Za-z]", line)]  # no blank, dot-progress or rule lines
    errors = [line for line in lines if _ERROR_WORDS.search(line)]
    chosen = (errors or lines or [None])[-1]
    return None if chosen is None else chosen[:300]


# ----------------------------------------------------------------------------------------------- build


def install(root: Path | None = None) -> Path:
    """Download, verify, extract and build llama.cpp's tools into the cache (idempotent); the install folder."""
    root = root or cache_dir()
    final = install_dir(root)
    if installed(root) is not None:
        return final
    cmake = _require_toolchain()
    tools_dir = final.parent
    tools_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(tools_dir)
    sdist = _download_sdist(tools_dir / ".downloads")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=tools_dir, prefix=f".build-{final.name}-") as tmp:
        work = Path(tmp)
        source, build, staged = work / "src", work / "build", work / final.name
        with tarfile.open(sdist, mode="r|gz") as tar:
            extract_tree(tar, LLAMA_CPP.source_prefix, source, skip=_skip_member)
        _apply_patches(source)
        _build(cmake, source, build, log=tools_dir / f"{final.name}-build.log")
        (staged / "bin").mkdir(parents=True)
        for name in BINARIES:
            shutil.copy2(build / "bin" / name, staged / "bin" / name)
            check_runs(staged / "bin" / name, name)
        (staged / "lib").mkdir()
        _link_ggml_library(build, staged / "lib" / GGML_LIBRARY)
        for part in _CONVERTER_PARTS:
            _copy(source / part, staged / part)
        write_stamp(staged, time.perf_counter() - started)
        _move_into_place(staged, final)
    sdist.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        sdist.parent.rmdir()
    return final


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cxx() -> str | None:
    """The C++ compiler cmake would find first ($CXX, then the usual names), or None."""
    found = (shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c)
    return next((path for path in found if path), None)


def _require_toolchain() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        raise NsdsError(
            f"building llama.cpp needs cmake, which is not installed: install {INSTALL_HINT}, or set {ENV_VAR} to "
            f"a folder with your own {TOOL_NAMES}"
        )
    if _cxx() is None:
        raise NsdsError(
            f"building llama.cpp needs a C++ compiler, and none was found (c++, g++, clang++, $CXX): install "
            f"{INSTALL_HINT}, or set {ENV_VAR} to a folder with your own {TOOL_NAMES}"
        )
    return cmake


def _download_sdist(folder: Path) -> Path:
    """The pinned sdist, downloaded once and verified; kept until the build succeeds, so a retry is offline."""
    asset = LLAMA_CPP
    target = folder / asset.sdist
    if not verified(target, asset.sha256):
        atomic_write(target, lambda out: check_digest(
            asset.sdist, download(asset.url, out, f"downloading {asset.sdist} from PyPI"), asset.sha256))  # fmt: skip
    return target


def _skip_member(parts: tuple[str, ...]) -> bool:
    """Source-tree members the build does not need: docs and media, and the vocab test files in models/."""
    return parts[0] in _SKIP_TOP or (parts[0] == "models" and len(parts) == 2)


def extract_tree(tar: tarfile.TarFile, prefix: str, target: Path, skip=lambda parts: False) -> int:
    """Extract the members under `prefix` (a folder inside the archive) into `target`, without the prefix.

    Works on a streamed archive. Only regular files and folders: a member that would land outside `target`
    (absolute, `..`) or is a link or device is refused with an NsdsError, before anything of it is written.
    Returns the number of files written.
    """
    prefix = prefix.strip("/") + "/"
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    count = 0
    for member in tar:
        if not member.name.startswith(prefix):
            continue
        rel = PurePosixPath(member.name[len(prefix) :])
        if not rel.parts:
            continue
        destination = (root / rel).resolve()
        if rel.is_absolute() or ".." in rel.parts or not destination.is_relative_to(root):
            raise NsdsError(f"refusing to extract '{member.name}': it would land outside '{target}'")
        if not (member.isfile() or member.isdir()):
            raise NsdsError(f"refusing to extract '{member.name}': links and special files are not expected")
        if skip(rel.parts):
            continue
        if member.isdir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        with destination.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        destination.chmod(0o755 if member.mode & 0o111 else 0o644)
        count += 1
    if count == 0:
        raise NsdsError(f"the archive holds nothing under '{prefix}'")
    return count


_CONFIGURE_HINTS = (
    (re.compile(r"No CMAKE_(C|CXX)_COMPILER could be found|CMAKE_(C|CXX)_COMPILER not set", re.I),
     f"no working C/C++ compiler: install {INSTALL_HINT}"),
    (re.compile(r"unable to find a build program|CMAKE_MAKE_PROGRAM is not set", re.I),
     "no build program (make or ninja): install `apt-get install make` or ninja"),
)  # fmt: skip


def _build(cmake: str, source: Path, build: Path, log: Path) -> None:
    """Configure and build the two tools; cmake's output goes to `log`, kept only when the build fails."""
    cores = _cores()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", str(source), "-B", str(build), *generator, *CMAKE_FLAGS]
    compile_ = [cmake, "--build", str(build), "--target", *BINARIES, "ggml-base", "-j", str(cores)]
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(source.parent)}  # build info: never a parent's repo
    note(
        f"building llama.cpp's {TOOL_NAMES} with cmake (about {build_minutes(cores)} minutes "
        f"on {cores} core{'s' if cores != 1 else ''})"
    )
    lines: list[str] = []
    try:
        for step, command in (("configure", configure), ("build", compile_)):
            lines.append(f"$ {' '.join(command)}")
            if _stream(command, env, lines, step) != 0:
                _write_log(log, lines)
                raise NsdsError(f"llama.cpp's cmake {step} failed: {_build_error(lines)} (full log: {log})")
    except OSError as err:
        raise NsdsError(f"cannot run cmake to build llama.cpp: {first_line(err)}") from None
    log.unlink(missing_ok=True)


def _apply_patches(source: Path) -> None:
    for relative, text, replacement in PATCHES:
        path = source / relative
        content = path.read_text()
        if content.count(text) != 1:
            raise NsdsError(f"cannot patch llama.cpp's {relative}: the pinned source differs from what nsds expects")
        path.write_text(content.replace(text, replacement))


def _link_ggml_library(build: Path, target: Path) -> None:
    """ggml-base's static archive (type traits, quantize and dequantize kernels) as one shared library."""
    archive = next(build.rglob("libggml-base.a"), None)
    compiler = _cxx()
    if archive is None or compiler is None:
        raise NsdsError(f"llama.cpp's build left no libggml-base.a to link {GGML_LIBRARY} from (or no C++ compiler)")
    command = [compiler, "-shared", "-o", str(target), "-Wl,--whole-archive", str(archive), "-Wl,--no-whole-archive",
               "-fopenmp", "-lpthread", "-lm", "-Wl,--no-undefined"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise NsdsError(f"linking {GGML_LIBRARY} failed: {_failure(result)}")


def _stream(command: list[str], env: dict, lines: list[str], step: str) -> int:
    """Run one cmake step, keeping its output; while building, note each quarter of the compile steps."""
    steps = re.compile(r"^\[\s*(\d+)/(\d+)\]|^\[\s*(\d+)%\]")  # ninja: [12/138], make: [ 45%]
    reported = 0
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        errors="replace", env=env,
    ) as process:  # fmt: skip
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            match = steps.match(line) if step == "build" else None
            if match:
                percent = 100 * int(match[1]) // int(match[2]) if match[1] else int(match[3])
                if percent >= reported + 25 and percent < 100:
                    reported = percent // 25 * 25
                    note(f"llama.cpp build {reported}% done")
        return process.wait()


def _build_error(lines: list[str]) -> str:
    """cmake's reason, one line: a compiler error, a CMake Error with its message, else the last lines."""
    text = "\n".join(lines)
    for pattern, message in _CONFIGURE_HINTS:
        if pattern.search(text):
            return message
    stripped = [line.strip() for line in lines]
    for i, line in enumerate(stripped):
        if re.search(r"\b(fatal )?error:", line):
            return line[:300]
        if line.startswith("CMake Error"):
            detail = next((other for other in stripped[i + 1 :] if other), "")
            return f"{line} {detail}"[:300]
    tail = [line for line in stripped if line][-2:]
    return " / ".join(line[:200] for line in tail) or "no output"


def _write_log(log: Path, lines: list[str]) -> None:
    with contextlib.suppress(OSError):
        log.write_text("\n".join(lines) + "\n")


def _copy(source: Path, destination: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, destination)
    elif source.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


def _move_into_place(staged: Path, final: Path) -> None:
    """Rename the finished build into place; an unstamped (interrupted, altered) folder there is replaced."""
    if final.exists():
        if installed(final.parent.parent) is not None:  # another process finished first
            return
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(staged, final)
    except OSError:
        if installed(final.parent.parent) is None:
            raise


def _remove_stale(tools_dir: Path, older_than_s: float = 24 * 3600) -> None:
    """Temporary build folders left by a killed build (a day old: never one that is still running)."""
    now = time.time()
    for leftover in [*tools_dir.glob(".build-*"), *tools_dir.glob(".trash-*")]:
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover)


# ----------------------------------------------------------------------------------------------- runners
#
# What the GGUF backend runs: llama-quantize (a base preset plus per-tensor overrides) and llama-perplexity,
# with typed results and one-line NsdsErrors. Both are checked against the pinned source (0.3.36's vendored
# tools/quantize/quantize.cpp, src/llama-quant.cpp, tools/perplexity/perplexity.cpp):
#
# - presets: llama-quantize's `--help` lists them ("  15  or  Q4_K_M  : ..."), matched case-insensitively.
# - per-tensor overrides (`--tensor-type-file`): whitespace-separated `pattern=type` words; the pattern is
#   lowercased and compiled as a std::regex (ECMAScript) that is SEARCHED in the tensor name (first match wins),
#   so an exact name needs `^...$` and escaped dots; the type is a ggml type name (q6_K, q8_0), any case.
#   Overrides apply only when the preset's default type is quantized (not F32/F16/BF16/COPY), and only to
#   tensors llama.cpp quantizes at all (2-D or more, named *weight, not *_norm.weight, ...).
# - a k-quant on a tensor whose row length (ne[0], the GGUF shape's first number) is not a multiple of 256
#   falls back: q2_K/q3_K -> q4_0, q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0, iq* (256) -> iq4_nl.


@dataclass(frozen=True)
class LlamaPerplexity:
    """What llama-perplexity reported: the final PPL, its +/- value, and the chunks it scored."""

    ppl: float
    stderr: float  # the "+/-" value llama-perplexity prints beside the PPL
    chunks: int  # chunks scored (its `[i]value,` progress)
    context: int  # tokens per chunk (-c)
    seconds: float  # wall time of the run, tokenization and model load included


TENSOR_TYPES_SUFFIX = ".tensor-types.txt"
_UNQUANTIZED_PRESETS = frozenset({"F32", "F16", "BF16", "COPY"})  # default type not quantized: overrides ignored


def preset_types() -> tuple[str, ...]:
    """The base types (presets) llama-quantize accepts, in the order its `--help` lists them (Q4_K_M, Q8_0...)."""
    return _presets(tools().quantize)


def _presets(binary: Path) -> tuple[str, ...]:
    stat = binary.stat()
    return _parse_presets_cached(str(binary), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _parse_presets_cached(binary: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    try:
        result = subprocess.run(
            [binary, "--help"], capture_output=True, text=True, errors="replace", timeout=30,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        raise NsdsError(f"cannot run llama-quantize --help ('{binary}'): {first_line(err)}") from None
    names = parse_quantize_help(result.stdout + result.stderr)
    if not names:
        raise NsdsError(f"llama-quantize --help ('{binary}') lists no quantization types: {_failure(result)}")
    return names


def parse_quantize_help(text: str) -> tuple[str, ...]:
    """The type names in llama-quantize's usage, after its "allowed quantization types" heading."""
    _, found, listing = text.partition("allowed quantization types")
    if not found:
        return ()
    names = re.findall(r"^\s*(?:\d+\s+or\s+)?([A-Z][A-Z0-9_]*)\s*:", listing, re.M)
    return tuple(dict.fromkeys(names))


def _ggml_type_names() -> dict[str, str]:
    """Upper-case name -> canonical name of the ggml types the gguf package knows (Q6_K, IQ4_NL, F16...)."""
    return {t.name.upper(): t.name for t in gguf.GGMLQuantizationType}


def _check_types(
    binary: Path, base_type: str, tensor_types: dict[str, str], source: Path
) -> tuple[str, dict[str, str]]:
    """The canonical base type and overrides, or an NsdsError naming what is unknown and what is valid."""
    presets = _presets(binary)
    by_upper = {name.upper(): name for name in presets}
    base = by_upper.get(str(base_type).upper())
    if base is None:
        raise NsdsError(f"unknown llama-quantize type '{base_type}': valid types are {', '.join(presets)}")
    if not tensor_types:
        return base, {}
    if base in _UNQUANTIZED_PRESETS:
        raise NsdsError(
            f"per-tensor types need a quantized base type: llama-quantize ignores them with '{base}' "
            f"(use one of {', '.join(p for p in presets if p not in _UNQUANTIZED_PRESETS)})"
        )
    # an override is a ggml type name: the ones llama-quantize also offers as a preset (Q6_K, Q8_0, IQ4_NL, F16;
    # not the mixtures Q4_K_M, Q3_K_S)
    ggml = _ggml_type_names()
    allowed = {upper: ggml[upper] for upper in by_upper if upper in ggml}
    infos = {info[0]: info for info in gguf_tensor_infos(source)}
    chosen: dict[str, str] = {}
    for name, type_ in tensor_types.items():
        canonical = allowed.get(str(type_).upper())
        if canonical is None:
            raise NsdsError(
                f"unknown tensor type '{type_}' for '{name}': valid types are {', '.join(allowed.values())}"
            )
        if name not in infos:
            some = ", ".join(list(infos)[:4])
            raise NsdsError(f"'{source.name}' has no tensor named '{name}' (its tensors are named like {some})")
        if not re.fullmatch(r"[^\sA-Z=]+", name):  # llama-quantize splits on whitespace and '=' and lowercases
            raise NsdsError(f"tensor name '{name}' cannot be given to llama-quantize (whitespace, '=' or capitals)")
        _, shape, _ = infos[name]
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            raise NsdsError(f"llama-quantize never quantizes '{name}' (shape {list(shape)}): it keeps its type")
        chosen[name] = canonical
    return base, chosen


def tensor_type_lines(tensor_types: dict[str, str]) -> str:
    """A `--tensor-type-file` for exact tensor names: one `^escaped-name$=type` word per line.

    Only ECMAScript's syntax characters are escaped (Python's re.escape also escapes `-`, `#`, `&`..., which
    std::regex need not accept): blk.0.ffn_down.weight -> `^blk\\.0\\.ffn_down\\.weight$`.
    """
    return "".join(f"^{_ecmascript_escape(name)}$={type_}\n" for name, type_ in tensor_types.items())


def _ecmascript_escape(text: str) -> str:
    return re.sub(r"[\\^$.|?*+()\[\]{}]", lambda m: "\\" + m[0], text)


def quantize_gguf(
    source: Path,
    target: Path,
    base_type: str,
    tensor_types: dict[str, str] | None = None,
    allow_requantize: bool = True,
    threads: int | None = None,
    timeout: float | None = None,
    imatrix: Path | None = None,
) -> None:
    """Quantize GGUF `source` into `target` with llama-quantize: preset `base_type`, per-tensor overrides, and
    with an importance matrix file when `imatrix` is given (`--imatrix`).

    `tensor_types` maps exact tensor names (blk.0.ffn_down.weight) to ggml types (q6_K); it is written beside the
    target as `<target stem>.tensor-types.txt` (the file llama-quantize read) and kept as its record. llama.cpp's
    own rules still apply: norms stay F32, and a k-quant on rows that are not a multiple of 256 falls back
    (see above): read the result with tensor_types_of(). The target is written to a temporary sibling and
    renamed, so it is never half-written; any failure is one NsdsError line and leaves no new target.
    """
    llama = tools()
    source, target = Path(source).absolute(), Path(target).absolute()  # absolute: never read as a type number
    if not source.is_file():
        raise NsdsError(f"GGUF file '{source}' does not exist")
    if target == source:
        raise NsdsError(f"llama-quantize cannot write over its source '{source}': choose another target")
    if threads is not None and threads < 1:
        raise NsdsError(f"threads must be at least 1, got {threads}")
    base, overrides = _check_types(llama.quantize, base_type, tensor_types or {}, source)
    types_file = target.with_suffix(TENSOR_TYPES_SUFFIX)
    with staged(target, "llama-quantize") as out, contextlib.ExitStack() as record:
        args: list[str | Path] = ["--allow-requantize"] if allow_requantize else []
        if imatrix is not None:
            args += ["--imatrix", Path(imatrix).absolute()]
        if overrides:
            staged_types = record.enter_context(staged(types_file, "nsds"))  # kept when the file is written
            staged_types.write_text(tensor_type_lines(overrides))
            args += ["--tensor-type-file", staged_types]
        args += [source, out, base]
        if threads is not None:
            args.append(str(threads))
        _run_streams(llama.quantize, args, "llama-quantize", timeout, explain=_quantize_failure)
        if not overrides:
            types_file.unlink(missing_ok=True)  # a record from an earlier run would describe another file


def _quantize_failure(result: subprocess.CompletedProcess) -> str | None:
    """llama-quantize's own reason ("failed to quantize: <reason>"), not its closing "failed to quantize model"."""
    reasons = re.findall(r"failed to quantize: (.+)", result.stderr + result.stdout)
    if not reasons:
        return None
    reason = reasons[-1].strip()
    if re.search(r"requantizing from type \S+ is disabled", reason):
        reason += " (pass allow_requantize=True)"
    return reason


def tensor_types_of(path: Path) -> dict[str, str]:
    """Every tensor's ggml type name (gguf's GGMLQuantizationType names: Q8_0, Q6_K, F32), in file order."""
    return {name: gguf.GGMLQuantizationType(type_id).name for name, _, type_id in gguf_tensor_infos(path)}


def gguf_tensor_infos(path: Path) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape as ne[0], ne[1]..., ggml type id) of each tensor, from a GGUF file's header only
    (nsds.gguf_header: ~0.1 s, where gguf.GGUFReader takes 2.6 s on SmolLM2's vocabulary)."""
    try:
        header = GGUFHeader(Path(path))
    except (OSError, ValueError, struct.error, KeyError, OverflowError) as err:
        raise NsdsError(f"cannot read the tensors of GGUF file '{path}': {first_line(err)}") from None
    return [(name, t.shape[::-1], t.qtype.value) for name, t in header.tensors.items()]


_FINAL_ESTIMATE = re.compile(r"Final estimate: PPL = ([0-9.]+|[-+]?(?:nan|inf)) \+/- ([0-9.]+|[-+]?(?:nan|inf))")
_CHUNK_SCORE = re.compile(r"\[(\d+)\]([-+]?(?:[0-9.]+|nan|inf)),")


def perplexity_gguf(
    model: Path,
    text: Path,
    context: int,
    chunks: int | None = None,
    threads: int | None = None,
    max_chars: int | None = None,
    timeout: float | None = None,
    save_logits: Path | None = None,
) -> LlamaPerplexity:
    """llama-perplexity's PPL of `model` on `text`, in chunks of `context` tokens (all of them, or `chunks`).

    llama-perplexity tokenizes the whole file every run (~3 s for Brown): `max_chars` scores only the text's
    first characters (written to a temporary file), which must hold the chunks asked for (an NsdsError if not).
    It needs at least 2 * context tokens whatever `chunks` is. `save_logits`: also write the log-probabilities
    there, the base of kl_divergence().
    """
    llama = tools()
    model, text = Path(model), Path(text)
    for path, what in ((model, "GGUF file"), (text, "text file")):
        if not path.is_file():
            raise NsdsError(f"{what} '{path}' does not exist")
    for value, what in ((context, "context"), (chunks, "chunks"), (threads, "threads"), (max_chars, "max_chars")):
        if (value is not None or what == "context") and (not isinstance(value, int) or value < 1):
            raise NsdsError(f"{what} must be a positive whole number, got {value!r}")
    with tempfile.TemporaryDirectory(prefix="nsds-perplexity-") as tmp:
        truncated = False
        if max_chars is not None:
            with text.open(encoding="utf-8", errors="replace") as source:
                prefix = source.read(max_chars)
                truncated = bool(source.read(1))
            if truncated:
                text = Path(tmp) / text.name
                text.write_text(prefix, encoding="utf-8")
        args: list[str | Path] = ["-m", model, "-f", text, "-c", str(context), "--no-warmup"]
        if chunks is not None:
            args += ["--chunks", str(chunks)]
        if threads is not None:
            args += ["-t", str(threads)]
        if save_logits is not None:
            args += ["--kl-divergence-base", save_logits]
        for _attempt in range(_LOG_ATTEMPTS):
            started = time.perf_counter()
            result = _run_streams(llama.perplexity, args, "llama-perplexity", timeout)
            seconds = time.perf_counter() - started
            final = _FINAL_ESTIMATE.search(result.stderr) or _FINAL_ESTIMATE.search(result.stdout)
            if final is not None or not _log_cut_short(result):
                break
    if final is None:
        reason = _strip_log_prefix(_meaningful_line(result.stderr) or _meaningful_line(result.stdout) or "no output")
        if truncated and re.search(r"tokenizes to only \d+ tokens", reason):
            reason += f" (max_chars={max_chars} kept too little of '{text.name}': raise max_chars)"
        raise NsdsError(f"llama-perplexity printed no final estimate: {reason}")
    ppl, plus_minus = float(final[1]), float(final[2])
    if not (math.isfinite(ppl) and math.isfinite(plus_minus)):
        raise NsdsError(f"llama-perplexity's PPL is not finite ({final[1]} +/- {final[2]}) for '{model.name}'")
    scored = max((int(i) for i, _ in _CHUNK_SCORE.findall(result.stdout)), default=0)
    if scored == 0:
        raise NsdsError("llama-perplexity printed a final estimate but no chunk scores")
    if truncated and chunks is not None and scored < chunks:
        raise NsdsError(
            f"max_chars={max_chars} holds only {scored} of the {chunks} chunks of {context} tokens asked for: "
            "raise max_chars"
        )
    return LlamaPerplexity(ppl=ppl, stderr=plus_minus, chunks=scored, context=context, seconds=seconds)


@dataclass(frozen=True)
class Divergence:
    """What llama-perplexity --kl-divergence reported against the base logits: the KL divergence of the
    model's next-token distribution from the base model's, per scored token (nats)."""

    mean: float
    mean_stderr: float  # its "±" value: the standard error of the mean
    p99: float  # 99th percentile of the per-token KLD
    same_top: float  # share of tokens whose most likely token is the base model's (0..1)
    ppl: float  # Mean PPL(Q): the model's perplexity on the same tokens
    ppl_stderr: float  # its "±" value
    context: int
    seconds: float


_KLD_LINES = {
    "mean": re.compile(r"^Mean +KLD: +([-+0-9.eE]+|nan) ± +([-+0-9.eE]+|nan)", re.M),
    "p99": re.compile(r"^99\.0% +KLD: +([-+0-9.eE]+|nan)", re.M),
    "same_top": re.compile(r"^Same top p: +([-+0-9.eE]+|nan) ± +([-+0-9.eE]+|nan) %", re.M),
    "ppl": re.compile(r"^Mean PPL\(Q\) +: +([-+0-9.eE]+|nan|inf) ± +([-+0-9.eE]+|nan|inf)", re.M),
}


def kld_base(model: Path, text: Path, logits: Path, context: int, chunks: int,
             timeout: float | None = None) -> LlamaPerplexity:  # fmt: skip
    """llama-perplexity on the base model, saving its log-probabilities on `chunks` chunks of `context` tokens
    of `text` into `logits` (what kl_divergence reads)."""
    result = perplexity_gguf(model, text, context, chunks, timeout=timeout, save_logits=logits)
    if not logits.is_file():
        raise NsdsError(f"llama-perplexity wrote no base logits to '{logits}'")
    return result


def kl_divergence(model: Path, logits: Path, context: int, timeout: float | None = None) -> Divergence:
    """llama-perplexity --kl-divergence: `model` on the tokens and against the log-probabilities in `logits`
    (kld_base's file)."""
    llama = tools()
    for path, what in ((model, "GGUF file"), (logits, "base logits file")):
        if not Path(path).is_file():
            raise NsdsError(f"{what} '{path}' does not exist")
    args = ["-m", model, "--kl-divergence-base", logits, "--kl-divergence", "-c", str(context), "--no-warmup"]
    started = time.perf_counter()
    result = _run_streams(llama.perplexity, args, "llama-perplexity --kl-divergence", timeout)
    seconds = time.perf_counter() - started
    output = result.stdout + "\n" + result.stderr
    found = {name: pattern.search(output) for name, pattern in _KLD_LINES.items()}
    if not all(found.values()):
        missing = next(name for name, match in found.items() if match is None)
        reason = _strip_log_prefix(_meaningful_line(result.stderr) or "no output")
        raise NsdsError(f"llama-perplexity --kl-divergence printed no {missing} statistic for '{model.name}': {reason}")
    return Divergence(
        mean=float(found["mean"][1]),
        mean_stderr=float(found["mean"][2]),
        p99=float(found["p99"][1]),
        same_top=float(found["same_top"][1]) / 100,
        ppl=float(found["ppl"][1]),
        ppl_stderr=float(found["ppl"][2]),
        context=context,
        seconds=seconds,
    )


def generate(model: Path, prompt: str, tokens: int, seed: int, sampling: tuple[str, ...],
             timeout: float | None = None) -> str:  # fmt: skip
    """The text `model` writes after `prompt` (special tokens parsed; "" for just the BOS token the vocabulary
    adds) in `tokens` tokens: llama-completion with `sampling`, the prompt not echoed."""
    llama = tools()
    args = ["-m", model, "-p", prompt, "-n", str(tokens), "-c", str(tokens + 8), "--seed", str(seed),
            "--no-display-prompt", *sampling]  # fmt: skip
    return _run_streams(llama.completion, args, "llama-completion", timeout).stdout


def make_imatrix(
    model: Path, text: Path, target: Path, context: int, chunks: int | None, timeout: float | None = None
) -> None:
    """llama-imatrix's importance matrix of `model` on `text` (`chunks` chunks of `context` tokens, at most what
    the text holds; None: all of them) written to `target` in its GGUF format, atomically."""
    llama = tools()
    with staged(target, "llama-imatrix") as out:
        args = ["-m", model, "-f", text, "-o", out, "-c", str(context), "--no-ppl", "--output-format", "gguf"]
        if chunks is not None:
            args += ["--chunks", str(chunks)]
        _run_streams(llama.imatrix, args, "llama-imatrix", timeout)


# llama.cpp's logger is a thread that main() does not wait for (common/log.cpp leaks it on purpose), so on a
# busy machine a run that succeeded can exit before its last lines (scores, final estimate) are printed.
# The nsds build flushes it (PATCHES); with a user's own build, a run cut short that way is repeated.
_LOG_ATTEMPTS = 3


def _log_cut_short(result: subprocess.CompletedProcess) -> bool:
    """A successful run without its final estimate and without an error in its log (level E): cut short."""
    return result.returncode == 0 and not _ERROR_LINE.search(result.stderr)


_ERROR_LINE = re.compile(r"^[\d.]+ E |error", re.M | re.I)


def _run_streams(path: Path, args: list, what: str, timeout: float | None, explain=None) -> subprocess.CompletedProcess:
    """Run a tool with stdout and stderr kept apart (llama-perplexity's scores go to stdout, its log to stderr).

    A failure names `explain(result)` when it finds the reason, else the tool's last error line, without the
    timestamp and level llama.cpp's log puts before it.
    """
    try:
        result = subprocess.run(
            [str(path), *map(str, args)], capture_output=True, text=True, errors="replace", timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise NsdsError(f"{what} did not finish in {timeout:g} s ({path.name})") from None
    except OSError as err:
        raise NsdsError(f"cannot run {what} ('{path}'): {first_line(err)}") from None
    if result.returncode != 0:
        reason = (explain and explain(result)) or _failure(result)
        raise NsdsError(f"{what} failed: {_strip_log_prefix(reason)}")
    return result


def _strip_log_prefix(line: str) -> str:
    """A line without llama.cpp's log timestamp and level: `0.00.407.843 E perplexity: ...` -> `perplexity: ...`."""
    return re.sub(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ", "", line)


# ----------------------------------------------------------------------------------------------- converter
#
# convert_hf_to_gguf.py (the copy beside the tools) run with this interpreter, so it sees the same torch,
# transformers and safetensors as nsds. It imports `gguf` after putting its own gguf-py at sys.path[1] (unless
# NO_LOCAL_GGUF is set), i.e. ahead of site-packages: nsds drops NO_LOCAL_GGUF and also puts gguf-py first on
# PYTHONPATH, so the converter always runs with the gguf-py it was released with, never the venv's gguf.
# Observed failures of the pinned converter (0.3.36), each turned into one line with what to do:
# - a Llama folder needs the `sentencepiece` package even without a tokenizer.model (it imports it first);
# - a byte-level BPE tokenizer.json is identified by a hash of how it tokenizes a fixed text, and an unknown
#   hash is refused ("BPE pre-tokenizer was not recognized"); a Llama-2 style tokenizer.json (BPE with
#   byte_fallback) and a sentencepiece tokenizer.model are taken without that check;
# - an architecture the converter has no class for: "Model FooForCausalLM is not supported".

CONVERT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt): .+")
_PROGRESS_BAR = re.compile(r"[^\n]*\|[^\n]*\|[^\n]*(?:it/s|s/it|byte/s|B/s|\?)\]")


def converter_env(script: Path) -> dict[str, str]:
    """The environment the converter runs in: its own gguf-py first on PYTHONPATH, no progress bars."""
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    paths = [str(script.parent / "gguf-py"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["TQDM_DISABLE"] = "1"  # tqdm >= 4.66: the converter's progress bars would only fill the captured log
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def convert_hf_to_gguf(folder: Path, target: Path, outtype: str = "f32", timeout: float | None = None) -> None:
    """Convert the Hugging Face model `folder` (config.json, safetensors, tokenizer) to the GGUF file `target`.

    Runs llama.cpp's convert_hf_to_gguf.py (from `tools()`) with this Python interpreter and the converter's own
    gguf-py package. `outtype` is f32, f16, bf16 or q8_0 (llama-quantize makes the other types from an f32 or
    f16 file). The target is written to a temporary sibling and renamed, so it is never half-written; any
    failure is one NsdsError line with the converter's reason, and leaves no new target.
    """
    import sys

    kind = str(outtype).lower()
    if kind not in CONVERT_OUTTYPES:
        raise NsdsError(f"unknown converter outtype '{outtype}': valid types are {', '.join(CONVERT_OUTTYPES)}")
    folder, target = Path(folder).absolute(), Path(target).absolute()
    if not folder.is_dir():
        raise NsdsError(f"model folder '{folder}' does not exist")
    if not (folder / "config.json").is_file():
        raise NsdsError(f"'{folder}' is not a Hugging Face model folder: it has no config.json")
    if target.is_dir():
        raise NsdsError(f"the GGUF target '{target}' is a folder: give a file name ending in .gguf")
    script = tools().convert_script
    if script is None:
        raise NsdsError(
            f"llama.cpp's {CONVERT_SCRIPT} was not found: run `nsds assets fetch llama.cpp`, or put the script "
            f"beside the tools in {ENV_VAR}"
        )
    with staged(target, "llama.cpp's converter") as out:
        command = [sys.executable, str(script), str(folder), "--outfile", str(out), "--outtype", kind]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, errors="replace", timeout=timeout,
                stdin=subprocess.DEVNULL, env=converter_env(script), cwd=script.parent,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise NsdsError(f"llama.cpp's converter did not finish in {timeout:g} s on '{folder.name}'") from None
        except OSError as err:
            raise NsdsError(f"cannot run llama.cpp's converter ('{script}'): {first_line(err)}") from None
        if result.returncode != 0:
            raise NsdsError(f"llama.cpp's converter failed on '{folder.name}': {_convert_failure(result)}")


def _convert_failure(result: subprocess.CompletedProcess) -> str:
    """The converter's reason, one line, with what to do: its exception line, else its last ERROR log line."""
    text = _PROGRESS_BAR.sub("", (result.stderr or "") + "\n" + (result.stdout or "")).replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    logged = [line.split(":", 2)[2].strip() for line in lines if line.startswith("ERROR:") and line.count(":") >= 2]
    if exceptions:
        reason = exceptions[-1]
    elif logged:
        reason = logged[-1]
    else:
        return _failure(result)
    reason = reason[:300]
    if module := re.search(r"No module named '([\w.]+)'", reason):
        package = module[1].split(".")[0]
        return f"{reason}: install it (`pip install {package}`) and convert again"
    if "pre-tokenizer was not recognized" in reason:
        digest = re.search(r"chkhsh:\s*([0-9a-f]{64})", text)
        which = f" (chkhsh {digest[1]})" if digest else ""
        return (
            f"{reason}{which}: this llama.cpp converter does not know the tokenizer's pre-tokenizer; use a model "
            f"whose tokenizer llama.cpp supports, or a newer llama.cpp's converter through {ENV_VAR}"
        )
    if re.search(r"Model \S+ is not supported|Architecture .+ not supported", reason):
        return f"{reason}: llama.cpp's converter does not support this architecture; give nsds a GGUF file instead"
    return reason
