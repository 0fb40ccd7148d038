"""llama.cpp's tools: the user's own binaries (NSDS_LLAMA_CPP), the cache stamp, safe extraction, errors.

The "binaries" here are tiny shell scripts standing where a user's llama.cpp build would: tools() and
run_streams() run them for real. Building the real tools is tests/integration/test_llamacpp_build.py's job.
"""

import io
import os
import tarfile
from pathlib import Path

import pytest

from nsds import assets, gguf_tools, llamacpp, programs, runtime
from nsds.errors import NsdsError

QUANTIZE = """#!/bin/sh
echo "usage: $0 [--help] [--allow-requantize] model-f32.gguf [model-quant.gguf] type [nthreads]"
exit 1
"""
PERPLEXITY = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "version: 4242 (abc1234)" >&2; exit 0; fi
echo "perplexity: calculating perplexity over 4 chunks" >&2
echo "Final estimate: PPL = 12.3456 +/- 0.78901" >&2
"""


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _own_build(folder: Path) -> Path:
    """A llama.cpp build folder as a user would have it: binaries under bin/."""
    _script(folder / "bin" / "llama-quantize", QUANTIZE)
    _script(folder / "bin" / "llama-perplexity", PERPLEXITY)
    for name in ("llama-imatrix", "llama-completion"):
        _script(folder / "bin" / name, "#!/bin/sh\necho usage\n")
    return folder


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No NSDS_LLAMA_CPP and an empty cache of our own."""
    monkeypatch.delenv(llamacpp.ENV_VAR, raising=False)
    monkeypatch.setenv("NSDS_CACHE", str(tmp_path / "cache"))


def test_own_binaries_from_a_build_folder(monkeypatch, tmp_path):
    source = tmp_path / "llama.cpp"
    build = _own_build(source / "build")
    (source / "convert_hf_to_gguf.py").write_text("# converter\n")
    (build / "bin" / "libggml-base.so").write_bytes(b"a shared build's ggml")
    monkeypatch.setenv(llamacpp.ENV_VAR, str(build))
    found = llamacpp.tools()
    assert found == llamacpp.LlamaCpp(
        quantize=build / "bin" / "llama-quantize",
        perplexity=build / "bin" / "llama-perplexity",
        imatrix=build / "bin" / "llama-imatrix",
        completion=build / "bin" / "llama-completion",
        convert_script=source / "convert_hf_to_gguf.py",
        source="env",
        version="4242 (abc1234)",
        ggml_library=build / "bin" / "libggml-base.so",
    )
    result = programs.run_streams(found.perplexity, ["-m", "x.gguf"], "llama-perplexity")
    assert "Final estimate: PPL = 12.3456" in result.stdout + result.stderr


def test_own_binaries_from_the_bin_folder_itself(monkeypatch, tmp_path):
    bin_dir = _own_build(tmp_path / "build") / "bin"
    monkeypatch.setenv(llamacpp.ENV_VAR, str(bin_dir))
    found = llamacpp.tools()
    assert (found.quantize, found.source, found.convert_script) == (bin_dir / "llama-quantize", "env", None)
    assert found.ggml_library is None  # a static build: nsds.ggml.library() then says how to get one


def test_env_folder_without_the_tools_is_a_clear_error(monkeypatch, tmp_path):
    _script(tmp_path / "llama-quantize", QUANTIZE)  # llama-perplexity is missing
    monkeypatch.setenv(llamacpp.ENV_VAR, str(tmp_path))
    tools = "llama-quantize, llama-perplexity, llama-imatrix and llama-completion"
    with pytest.raises(NsdsError, match=rf"NSDS_LLAMA_CPP=.* holds no {tools}"):
        llamacpp.tools()


def test_missing_tools_say_how_to_get_them(no_env):
    with pytest.raises(NsdsError) as err:
        llamacpp.tools()
    message = str(err.value)
    assert "llama.cpp's tools are not built: run `nsds assets fetch llama.cpp` (about " in message
    assert f"or set NSDS_LLAMA_CPP to a folder with {llamacpp.TOOL_NAMES}" in message
    assert "\n" not in message
    with pytest.raises(NsdsError, match=r"run `nsds assets fetch llama.cpp`"):
        assets.path("llama.cpp")


@pytest.mark.parametrize("name", ["llama-quantize", "llama-perplexity", "llama-imatrix", "llama-completion"])
def test_a_binary_that_is_not_a_program_is_one_line(monkeypatch, tmp_path, name):
    """Every tool is checked before any work (a broken llama-perplexity used to be found after the model load)."""
    build = _own_build(tmp_path / "build")
    (build / "bin" / name).write_bytes(b"\x7fELF garbage, not a program")
    monkeypatch.setenv(llamacpp.ENV_VAR, str(build))
    with pytest.raises(NsdsError, match=rf"{name} '.*' does not run: .*Exec format error") as err:
        llamacpp.tools()
    assert "\n" not in str(err.value)


def test_a_binary_missing_its_libraries_names_them(monkeypatch, tmp_path):
    build = _own_build(tmp_path / "build")
    _script(
        build / "bin" / "llama-quantize",
        "#!/bin/sh\necho 'llama-quantize: error while loading shared libraries: libllama.so: cannot open shared "
        "object file: No such file or directory' >&2\nexit 127\n",
    )
    monkeypatch.setenv(llamacpp.ENV_VAR, str(build))
    with pytest.raises(NsdsError, match=r"does not run: .*libllama.so: cannot open .* \(exit status 127\)$"):
        llamacpp.tools()


def test_a_failing_tool_is_its_last_error_line(tmp_path):
    tool = _script(
        tmp_path / "tool",
        "#!/bin/sh\necho 'loading ...' >&2\necho 'llama_model_load: error loading model: bad magic' >&2\n"
        "echo 'main: unable to load model' >&2\necho '.....' >&2\nexit 3\n",
    )
    with pytest.raises(NsdsError, match=r"^llama-perplexity failed: main: unable to load model \(exit status 3\)$"):
        programs.run_streams(tool, ["-m", "x"], "llama-perplexity")
    with pytest.raises(NsdsError, match="cannot run llama-quantize"):
        programs.run_streams(tmp_path / "missing", [], "llama-quantize")


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size, info.mode = len(member[1]), 0o755 if member[0].endswith(".py") else 0o644
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def _extract(archive: Path, target: Path) -> int:
    with tarfile.open(archive, "r|gz") as tar:
        return llamacpp.extract_tree(tar, "pkg-1.0/vendor/llama.cpp", target, skip=llamacpp._skip_member)


def test_extraction_takes_only_the_vendored_tree(tmp_path):
    archive = _tar(
        tmp_path / "sdist.tar.gz",
        [
            ("pkg-1.0/setup.py", b"not llama.cpp"),
            ("pkg-1.0/vendor/llama.cpp/CMakeLists.txt", b"project(llama)"),
            ("pkg-1.0/vendor/llama.cpp/convert_hf_to_gguf.py", b"# converter"),
            ("pkg-1.0/vendor/llama.cpp/docs/build.md", b"docs are skipped"),
            ("pkg-1.0/vendor/llama.cpp/models/ggml-vocab-llama.gguf", b"vocab test files are skipped"),
            ("pkg-1.0/vendor/llama.cpp/models/templates/chat.jinja", b"kept: converters read templates"),
        ],
    )
    target = tmp_path / "src"
    assert _extract(archive, target) == 3
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["CMakeLists.txt", "convert_hf_to_gguf.py", "models/templates/chat.jinja"]
    assert os.access(target / "convert_hf_to_gguf.py", os.X_OK)


@pytest.mark.parametrize(
    "name", ["pkg-1.0/vendor/llama.cpp/../../../escaped.txt", "pkg-1.0/vendor/llama.cpp/ggml/../../x.txt"]
)
def test_extraction_refuses_members_escaping_the_target(tmp_path, name):
    archive = _tar(tmp_path / "evil.tar.gz", [("pkg-1.0/vendor/llama.cpp/CMakeLists.txt", b"ok"), (name, b"evil")])
    target = tmp_path / "deep" / "src"
    with pytest.raises(NsdsError, match=r"refusing to extract .* it would land outside"):
        _extract(archive, target)
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("x.txt"))


def test_extraction_refuses_links(tmp_path):
    link = tarfile.TarInfo("pkg-1.0/vendor/llama.cpp/passwd")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar(tmp_path / "link.tar.gz", [link])
    with pytest.raises(NsdsError, match="links and special files are not expected"):
        _extract(archive, tmp_path / "src")


def _stamped_install(root: Path) -> Path:
    folder = llamacpp.install_dir(root)
    _own_build(folder)
    (folder / "convert_hf_to_gguf.py").write_text("# converter\n")
    (folder / "lib").mkdir()
    (folder / "lib" / llamacpp.GGML_LIBRARY).write_bytes(b"a shared library")
    llamacpp.write_stamp(folder, seconds=1.0)
    return folder


def test_a_stamped_build_is_found_and_not_rebuilt(no_env, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    folder = _stamped_install(root)
    assert folder == root / "tools" / "llama.cpp-0.3.36"
    found = llamacpp.tools()
    assert (found.source, found.version, found.quantize) == ("cache", "0.3.36", folder / "bin" / "llama-quantize")
    assert found.convert_script == folder / "convert_hf_to_gguf.py"
    assert found.ggml_library == folder / "lib" / llamacpp.GGML_LIBRARY
    assert assets.path("llama.cpp") == folder

    def no_download(*args):
        raise AssertionError("a finished build must not be fetched again")

    monkeypatch.setattr(llamacpp, "_download_sdist", no_download)
    assert llamacpp.install(root) == folder
    assert assets.fetch(["llama.cpp"], root=root) == {"llama.cpp": folder}


def test_an_unfinished_or_altered_build_is_not_accepted(no_env, tmp_path):
    root = tmp_path / "cache"
    folder = _stamped_install(root)
    assert llamacpp.installed(root) is not None
    _script(folder / "bin" / "llama-perplexity", PERPLEXITY + "# changed\n")
    assert llamacpp.installed(root) is None  # a binary that is not the one built
    llamacpp.write_stamp(folder)
    assert llamacpp.installed(root) is not None
    (folder / "lib" / llamacpp.GGML_LIBRARY).write_bytes(b"another library")
    assert llamacpp.installed(root) is None  # a library that is not the one built
    llamacpp.write_stamp(folder)
    stamp = (folder / llamacpp.STAMP).read_text()
    (folder / llamacpp.STAMP).write_text(stamp.replace('"0.3.36"', '"0.3.35"'))
    assert llamacpp.installed(root) is None  # another version's build
    (folder / llamacpp.STAMP).write_text(stamp[: len(stamp) // 2])
    assert llamacpp.installed(root) is None  # a half-written stamp
    (folder / llamacpp.STAMP).unlink()
    assert llamacpp.installed(root) is None  # interrupted before the stamp
    with pytest.raises(NsdsError, match=r"llama.cpp's tools are not built"):
        llamacpp.tools()


def test_fetch_all_uses_the_users_own_tools(monkeypatch, tmp_path):
    build = _own_build(tmp_path / "build")
    monkeypatch.setenv(llamacpp.ENV_VAR, str(build))
    assert assets._fetch_llama_cpp(tmp_path / "cache", explicit=False) == build / "bin"
    assert not (tmp_path / "cache").exists()


def test_building_without_cmake_names_what_to_install(no_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(NsdsError, match=r"needs cmake, which is not installed: install `apt-get install cmake g\+\+`"):
        llamacpp.install(tmp_path / "cache")


def test_build_errors_are_one_line():
    configure = ["-- The C compiler identification is GNU 12.2.0", "CMake Error at CMakeLists.txt:3 (project):",
                 "", "  The CMAKE_CXX_COMPILER:", "-- Configuring incomplete, errors occurred!"]  # fmt: skip
    assert llamacpp._build_error(configure) == "CMake Error at CMakeLists.txt:3 (project): The CMAKE_CXX_COMPILER:"
    missing = ["CMake Error at CMakeLists.txt:2 (project):", "  No CMAKE_CXX_COMPILER could be found."]
    assert "install `apt-get install cmake g++`" in llamacpp._build_error(missing)
    compile_ = ["[3/138] Building CXX object x.o", "FAILED: x.o", "src/llama.cpp:12:5: error: 'foo' was not declared",
                "ninja: build stopped: subcommand failed."]  # fmt: skip
    assert llamacpp._build_error(compile_) == "src/llama.cpp:12:5: error: 'foo' was not declared"


def test_a_finished_build_replaces_an_interrupted_one(no_env, tmp_path):
    root = tmp_path / "cache"
    final = llamacpp.install_dir(root)
    _script(final / "bin" / "llama-quantize", "half a binary")  # no stamp: interrupted
    staged = _stamped_install(tmp_path / "work")
    llamacpp._move_into_place(staged, final)
    assert not staged.exists() and llamacpp.installed(root) is not None
    assert (final / "bin" / "llama-quantize").read_text() == QUANTIZE


CUT_SHORT_ONCE = """#!/bin/sh
if [ "$1" = "--version" ] || [ "$1" = "--help" ]; then echo "version: 4242 (abc1234)" >&2; exit 0; fi
echo "[1]12.0,[2]12.2,"
if [ ! -e "$(dirname "$0")/ran-once" ]; then
  touch "$(dirname "$0")/ran-once"
  printf "0.00.1 I perplexity: 0.27 seconds per pass - ETA" >&2
  exit 0
fi
echo "[3]12.3,[4]12.3456,"
echo "0.00.1 I Final estimate: PPL = 12.3456 +/- 0.78901" >&2
"""


def _perplexity_tool(tmp_path, monkeypatch, script: str) -> tuple[Path, Path]:
    build = _own_build(tmp_path / "build")
    _script(build / "bin" / "llama-perplexity", script)
    monkeypatch.setenv(llamacpp.ENV_VAR, str(build))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "text.txt").write_text("some text")
    return tmp_path / "model.gguf", tmp_path / "text.txt"


def test_a_perplexity_run_whose_log_was_cut_short_is_repeated(tmp_path, monkeypatch):
    """llama.cpp's logger thread can lose the last lines when a run exits on a busy machine (a user's build
    without nsds's patch): the run is repeated instead of failing."""
    model, text = _perplexity_tool(tmp_path, monkeypatch, CUT_SHORT_ONCE)
    result = gguf_tools.perplexity_gguf(model, text, context=64, chunks=4)
    assert (result.ppl, result.chunks) == (12.3456, 4)


def test_a_files_perplexity_is_measured_with_its_plus_minus(tmp_path, monkeypatch):
    """runtime.measure (nsds compare's llama-perplexity of a GGUF file) keeps the PPL and its +/- value."""
    model, text = _perplexity_tool(tmp_path, monkeypatch, CUT_SHORT_ONCE)
    measured = runtime.measure(model, text, window=64, tokens=256)
    assert (measured.ppl, measured.ppl_stderr, measured.chunks, measured.file_bytes) == (12.3456, 0.78901, 4, 4)


def test_a_perplexity_run_always_cut_short_fails_in_one_line(tmp_path, monkeypatch):
    always = CUT_SHORT_ONCE.replace('[ ! -e "$(dirname "$0")/ran-once" ]', "true")
    model, text = _perplexity_tool(tmp_path, monkeypatch, always)
    with pytest.raises(NsdsError, match="llama-perplexity printed no final estimate") as err:
        gguf_tools.perplexity_gguf(model, text, context=64, chunks=4)
    assert "\n" not in str(err.value)


def test_a_source_tree_the_patches_do_not_fit_is_refused(tmp_path):
    relative, _, _ = llamacpp.PATCHES[0]
    (tmp_path / relative).parent.mkdir(parents=True)
    (tmp_path / relative).write_text("int main() { return 0; }\n")
    with pytest.raises(NsdsError, match=r"cannot patch llama\.cpp's tools/perplexity/perplexity\.cpp"):
        llamacpp._apply_patches(tmp_path)
