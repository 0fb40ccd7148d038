"""llama.cpp's command-line tools (llama-quantize, llama-perplexity, llama-imatrix, llama-completion) and its
HF -> GGUF converter: built or found, and checked to start (running them: nsds.programs). What nsds asks of each
tool is in gguf_tools (and gguf_convert for the converter).

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
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from nsds.errors import NsdsError, first_line
from nsds.files import atomic_write, cache_dir, check_digest, download, sha256_file, verified, write_json
from nsds.programs import check_runs, failure_reason
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
        raise NsdsError(f"linking {GGML_LIBRARY} failed: {failure_reason(result)}")


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
