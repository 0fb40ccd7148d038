"""The llama.cpp tools from `nsds assets fetch llama.cpp` (or NSDS_LLAMA_CPP) on the real SmolLM2 GGUF.

Skipped, with the reason, when the tools are not built: building them takes minutes (README).
"""

import re

import gguf
import pytest

from nsds import llamacpp, programs
from nsds.errors import NsdsError

from needs import missing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama() -> llamacpp.LlamaCpp:
    try:
        return llamacpp.tools()
    except NsdsError as err:
        missing(f"llama.cpp test needs the built tools: {err}")


def test_built_tools_are_complete(llama):
    if llama.source == "cache":
        assert llama.version == "0.3.36"
        assert llama.convert_script is not None and llama.convert_script.is_file()
        assert (llama.convert_script.parent / "gguf-py" / "gguf" / "gguf_reader.py").is_file()
        assert (llama.convert_script.parent / "conversion" / "__init__.py").is_file()
    programs.check_runs(llama.perplexity, "llama-perplexity")


def test_requantize_smollm2_to_q8_0(llama, smollm2_gguf, tmp_path):
    out = tmp_path / "smollm2-q8_0.gguf"
    args = ["--allow-requantize", smollm2_gguf, out, "Q8_0", "2"]
    result = programs.run_streams(llama.quantize, args, "llama-quantize", timeout=120)
    output = result.stdout + result.stderr
    assert re.search(r"model size\s*=", output), output[-2000:]

    source = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}
    result = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert result.keys() == source.keys()
    for name, tensor in result.items():
        assert list(tensor.shape) == list(source[name].shape), name
        if source[name].tensor_type == gguf.GGMLQuantizationType.F32:  # norms stay float
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        else:  # every quantized matrix (Q4_1 blocks, the Q8_0 embedding) is now Q8_0
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
    weights = [n for n in result if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
    assert len(weights) == 30 * 7
