"""llama.cpp as the runtime of a plan (docs/GGUF.md): the GGUF every file is quantized from, llama.cpp's
presets as budgets and as plans, the export of a plan, its predicted size, and llama-perplexity.

Every GGUF nsds writes is quantized by llama-quantize from one base file: the input GGUF itself
(requantized), or a Hugging Face folder converted losslessly (bf16, f16 or f32, as its weights are) by
llama.cpp's own converter and kept in the cache. Tensors outside the plan (token embedding, output head,
norms) are stored as the matched preset stores them, or as BASE_TYPE for a budget in bits; only the
planned modules differ between the files, so a plan no larger than a preset's modules gives a file no
larger than the preset's.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from nsds import ggml, gguf_convert, gguf_tools, importance
from nsds.allocate import plan_of
from nsds.errors import NsdsError
from nsds.files import cache_dir, sha256_file
from nsds.gguf_header import GGUFHeader
from nsds.plan import Module, Plan
from nsds.progress import stage
from nsds.quantize.base import Quantizer, Storage
from nsds.results import RuntimeMeasure
from nsds.weights.base import WeightSource
from nsds.weights.gguf import GGUFSource

# llama.cpp's presets (llama-quantize's names), smallest first within each family: the k-quant mixes and the
# i-quant ones; the presets llama-quantize writes only with an importance matrix (IQ2 and IQ1 tensors).
K_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
I_PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
             "IQ4_XS", "IQ4_NL")  # fmt: skip
PRESETS = K_PRESETS + I_PRESETS
PRESETS_NEEDING_IMPORTANCE = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"})
BASE_TYPE = "Q8_0"  # how tensors outside the plan are stored when the budget is a number of bits
_CONVERT_TYPES = {"bfloat16": "bf16", "float16": "f16"}  # other checkpoints convert to f32


def preset_name(budget: str, rounds_by_importance: bool) -> str:
    """A llama.cpp preset by name (case-insensitive), or a one-line error listing them (or saying the job
    cannot write it: it does not round by an importance matrix)."""
    name = budget.strip().upper()
    if name not in PRESETS:
        raise NsdsError(f"unknown llama.cpp preset '{budget}'; choose from {', '.join(PRESETS)} or give bits (4.5)")
    if name in PRESETS_NEEDING_IMPORTANCE and not rounds_by_importance:
        raise NsdsError(f"llama.cpp writes the {name} preset only with an importance matrix, which this job does "
                        "not round by: use nsds run without --imatrix none (its default makes one)")  # fmt: skip
    return name


def base_gguf(source: WeightSource) -> Path:
    """The GGUF every file of this model is quantized from: the input GGUF, or the folder converted once."""
    if isinstance(source, GGUFSource):
        return source.path
    if source.location is None or not source.location.is_dir():
        raise NsdsError(f"'{source.model_id}' is neither a GGUF file nor a model folder llama.cpp can convert")
    dtype = str(getattr(source.config, "dtype", None) or "float32").removeprefix("torch.")
    outtype = _CONVERT_TYPES.get(dtype, "f32")
    digest = hashlib.sha256(outtype.encode())
    for path in sorted(p for p in source.location.iterdir() if p.is_file()):  # weights, config, tokenizer: all
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())  # the converter may read

    target = cache_dir() / "gguf" / f"{digest.hexdigest()[:16]}-{outtype}.gguf"
    if not target.is_file():
        gguf_convert.convert_hf_to_gguf(source.location, target, outtype)
    return target


def tensor_names(base: Path, modules: Iterable[str]) -> dict[str, str]:
    """Module name -> the GGUF tensor that holds its weight (gguf-py's name table, as the weight source uses)."""
    with GGUFSource(base) as gguf_source:
        names = {name: gguf_source.gguf_name(f"{name}.weight") for name in modules}
    missing = [name for name, tensor in names.items() if tensor is None]
    if missing:
        raise NsdsError(f"'{base.name}' holds no tensor for {', '.join(missing[:3])}: llama.cpp stores this model "
                        "differently (fused or renamed tensors), which nsds cannot plan yet")  # fmt: skip
    return {name: tensor for name, tensor in names.items() if tensor is not None}


def preset_file(base: Path, preset: str, folder: Path, imatrix: Path | None = None) -> Path:
    """llama.cpp's own preset of the base file, quantized by llama-quantize into `folder` (with the importance
    matrix file `imatrix`, when given)."""
    target = folder / f"{preset}.gguf"
    gguf_tools.quantize_gguf(base, target, preset, imatrix=imatrix)
    return target


def preset_budget(path: Path, names: Mapping[str, str], modules: Sequence[Module]) -> float:
    """The storage bits per weight the preset file at `path` spends on the planned modules."""
    tensors = GGUFHeader(path).tensors
    return sum(8 * tensors[names[m.name]].nbytes for m in modules) / sum(m.params for m in modules)


def preset_plan(target: "GGUFTarget", modules: Sequence[Module], quantizer: Quantizer, model: str) -> Plan:
    """llama.cpp's preset as a plan: the type its rules gave every planned module, read from its file."""
    assert target.preset is not None and target.preset_path is not None
    preset, names = target.preset, target.names
    tensors = GGUFHeader(target.preset_path).tensors
    storage, bits = {}, {}
    for m in modules:
        tensor = tensors[names[m.name]]
        kind = ggml.ggml_type(tensor.qtype.name)
        storage[m.name] = Storage(kind.name, kind.block_size, 8 * tensor.nbytes)
        bits[m.name] = kind.nominal_bits  # the width of its type (quantize.gguf.TYPES), fallbacks too
    reasons = {m.name: {"allocator": "llama.cpp preset", "preset": preset} for m in modules}
    widths = sorted(set(bits.values()))
    plan = plan_of(modules, bits, reasons, quantizer, model, f"llama.cpp {preset}", None, widths, storage)
    return replace(plan, embeddings=target.embeddings)


def export(plan: Plan, base: Path, base_type: str, names: Mapping[str, str], target: Path,
           imatrix: Path | None = None) -> dict[str, str]:  # fmt: skip
    """Write the plan as a GGUF with llama-quantize (every planned tensor overridden to its planned type, the
    rest as `base_type` stores them, all rounded by the importance matrix file `imatrix` when given); the
    tensor-type file it read is kept beside it. Returns the overrides, after checking every planned tensor
    was written as planned."""
    overrides = {names[m.name]: m.format for m in plan.modules}
    gguf_tools.quantize_gguf(base, target, base_type, overrides, imatrix=imatrix)
    written = GGUFHeader(target).tensors
    wrong = [f"{t} is {written[t].qtype.name}, planned {kind}" for t, kind in overrides.items()
             if written[t].qtype.name != kind]  # fmt: skip
    if wrong:
        target.unlink(missing_ok=True)
        raise NsdsError(f"llama-quantize did not write the plan's types: {'; '.join(wrong[:2])}")
    return overrides


@dataclass(frozen=True)
class GGUFTarget:
    """What a GGUF run writes from: the base file, where each planned module's tensor is, how tensors
    outside the plan are stored, and the matched preset (its file and the budget it spends)."""

    base: Path
    names: dict[str, str]  # module name -> GGUF tensor name
    base_type: str  # llama-quantize's type argument: the preset, or BASE_TYPE
    preset: str | None = None
    preset_path: Path | None = None
    budget: float | None = None  # storage bits per weight the preset spends on the planned modules
    imatrix: Path | None = None  # the importance matrix every file (the preset's too) is quantized with

    @property
    def embeddings(self) -> str:
        """How the tensors outside the plan are stored, for the plan's record."""
        if self.preset is not None:
            return (f"token embedding, output head and norms are stored as llama.cpp's {self.preset} stores them, "
                    "outside the budget (so the file is no larger than the preset's)")  # fmt: skip
        return f"token embedding and output head are stored as {self.base_type} (norms F32), outside the budget"


def gguf_target(source: WeightSource, modules: Sequence[Module], preset: str | None, folder: Path,
                rounds_by_importance: bool) -> GGUFTarget:  # fmt: skip
    """Check llama.cpp's tools and ggml library, find (or convert) the base file, and quantize the preset to
    learn its size. `rounds_by_importance`: the job rounds by an importance matrix, made later; the types
    llama.cpp's rules give a preset depend on whether there is one, not on its values, so the preset is sized
    with a flat one (nsds.importance.flat) and quantized again with the real one (with_importance)."""
    ggml.library()  # also checks llama-quantize runs
    base = base_gguf(source)
    names = tensor_names(base, [m.name for m in modules])
    if preset is None:
        return GGUFTarget(base, names, BASE_TYPE)
    flat = importance.flat(base, folder / f"flat{importance.SUFFIX}") if rounds_by_importance else None
    path = preset_file(base, preset, folder, flat)
    return GGUFTarget(base, names, preset, preset, path, preset_budget(path, names, modules))


def with_importance(target: GGUFTarget, imatrix: Path, modules: Sequence[Module], folder: Path) -> GGUFTarget:
    """The target with every file quantized by the importance matrix file `imatrix`: the preset is quantized
    again with it (llama.cpp's rules for some presets read whether there is one) and its budget read again."""
    if target.preset is None:
        return replace(target, imatrix=imatrix)
    path = preset_file(target.base, target.preset, folder, imatrix)
    return replace(target, imatrix=imatrix, preset_path=path, budget=preset_budget(path, target.names, modules))


def write_files(target: GGUFTarget, plans: Mapping[str, Plan], folder: Path) -> dict[str, Path]:
    """Every plan as a GGUF in `folder` (label.gguf), with the base file as "reference" and the preset's."""
    files = {"reference": target.base}
    for label, plan in plans.items():
        files[label] = folder / f"{label}.gguf"
        export(plan, target.base, target.base_type, target.names, files[label], target.imatrix)
    if target.preset is not None and target.preset_path is not None:
        files[target.preset] = target.preset_path
    return files


def text_file(text: str, tokens: int, folder: Path, chars_per_token: int = 16) -> Path:
    """The evaluation text's start, generously more than `tokens` tokens, for llama-perplexity (which
    tokenizes all it is given)."""
    path = folder / "text.txt"
    path.write_text(text[: tokens * chars_per_token], encoding="utf-8")
    return path


def measure(path: Path, text: Path, window: int, tokens: int) -> RuntimeMeasure:
    """llama-perplexity on the file: chunks of `window` tokens over the same `tokens` tokens of text as nsds's
    own windows (llama-perplexity scores the second half of each chunk)."""
    stage(f"llama-perplexity {path.name}")
    result = gguf_tools.perplexity_gguf(path, text, context=window, chunks=max(1, tokens // window))
    return RuntimeMeasure(path.name, path.stat().st_size, result.ppl, result.ppl_stderr, result.context, result.chunks,
                          result.seconds)  # fmt: skip


def measure_files(files: Mapping[str, Path], text: Path, window: int, tokens: int,
                  folder: Path) -> dict[str, RuntimeMeasure]:  # fmt: skip
    """llama-perplexity on every file, on chunks of `window` tokens over the same `tokens` tokens of text as
    nsds's own windows (it scores the second half of each chunk): the "reference" file's perplexity, its
    log-probabilities kept in `folder`, then every other file's KL divergence from them (and perplexity)."""
    stage(f"llama-perplexity {files['reference'].name} (the reference's log-probabilities)")
    logits = folder / "reference.kld"
    base = gguf_tools.kld_base(files["reference"], text, logits, context=window, chunks=max(1, tokens // window))
    measured = {"reference": RuntimeMeasure(files["reference"].name, files["reference"].stat().st_size, base.ppl,
                                            base.ppl_stderr, base.context, base.chunks, base.seconds)}  # fmt: skip
    for label, path in files.items():
        if label != "reference":
            stage(f"llama-perplexity --kl-divergence {path.name}")
            kld = gguf_tools.kl_divergence(path, logits, context=window)
            measured[label] = RuntimeMeasure(path.name, path.stat().st_size, kld.ppl, kld.ppl_stderr, kld.context,
                                             base.chunks, kld.seconds, kld.mean, kld.mean_stderr, kld.p99,
                                             kld.same_top)  # fmt: skip
    logits.unlink(missing_ok=True)
    return measured
