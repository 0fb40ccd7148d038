"""What nsds asks of llama.cpp's tools: llama-quantize, llama-perplexity (perplexity and KL divergence),
llama-completion and llama-imatrix, each with typed results and one-line NsdsErrors."""

import contextlib
import functools
import math
import re
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from nsds.errors import NsdsError, first_line
from nsds.files import staged
from nsds.gguf_header import GGUFHeader
from nsds.llamacpp import tools
from nsds.programs import failure_reason, meaningful_line, run_streams, strip_log_prefix

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
    ppl_stderr: float  # the "+/-" value llama-perplexity prints beside the PPL
    chunks: int  # chunks scored (its `[i]value,` progress)
    context: int  # tokens per chunk (-c)
    seconds: float  # wall time of the run, tokenization and model load included


TENSOR_TYPES_SUFFIX = ".tensor-types.txt"
_UNQUANTIZED_PRESETS = frozenset({"F32", "F16", "BF16", "COPY"})  # default type not quantized: overrides ignored


def presets_of(binary: Path) -> tuple[str, ...]:
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
        raise NsdsError(f"llama-quantize --help ('{binary}') lists no quantization types: {failure_reason(result)}")
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
    presets = presets_of(binary)
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
        run_streams(llama.quantize, args, "llama-quantize", timeout, explain=_quantize_failure)
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
            result = run_streams(llama.perplexity, args, "llama-perplexity", timeout)
            seconds = time.perf_counter() - started
            final = _FINAL_ESTIMATE.search(result.stderr) or _FINAL_ESTIMATE.search(result.stdout)
            if final is not None or not _log_cut_short(result):
                break
    if final is None:
        reason = strip_log_prefix(meaningful_line(result.stderr) or meaningful_line(result.stdout) or "no output")
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
    return LlamaPerplexity(ppl=ppl, ppl_stderr=plus_minus, chunks=scored, context=context, seconds=seconds)


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
    result = run_streams(llama.perplexity, args, "llama-perplexity --kl-divergence", timeout)
    seconds = time.perf_counter() - started
    output = result.stdout + "\n" + result.stderr
    found = {name: pattern.search(output) for name, pattern in _KLD_LINES.items()}
    if not all(found.values()):
        missing = next(name for name, match in found.items() if match is None)
        reason = strip_log_prefix(meaningful_line(result.stderr) or "no output")
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
    return run_streams(llama.completion, args, "llama-completion", timeout).stdout


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
        run_streams(llama.imatrix, args, "llama-imatrix", timeout)


# llama.cpp's logger is a thread that main() does not wait for (common/log.cpp leaks it on purpose), so on a
# busy machine a run that succeeded can exit before its last lines (scores, final estimate) are printed.
# The nsds build flushes it (PATCHES); with a user's own build, a run cut short that way is repeated.
_LOG_ATTEMPTS = 3


def _log_cut_short(result: subprocess.CompletedProcess) -> bool:
    """A successful run without its final estimate and without an error in its log (level E): cut short."""
    return result.returncode == 0 and not _ERROR_LINE.search(result.stderr)


_ERROR_LINE = re.compile(r"^[\d.]+ E |error", re.M | re.I)
