"""Hugging Face folder -> GGUF file, by llama.cpp's own convert_hf_to_gguf.py."""

import os
import re
import subprocess
from pathlib import Path

from nsds.errors import NsdsError
from nsds.files import staged
from nsds.llamacpp import CONVERT_SCRIPT, ENV_VAR, tools
from nsds.programs import completed, failure_reason

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
        result = completed(command, timeout, f"cannot run llama.cpp's converter ('{script}')",
                           f"llama.cpp's converter on '{folder.name}'",
                           env=converter_env(script), cwd=script.parent)  # fmt: skip
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
        return failure_reason(result)
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
