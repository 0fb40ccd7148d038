"""nsds.llamacpp's runners (quantize_gguf, perplexity_gguf) on the real SmolLM2 GGUF and Brown text.

Skipped, with the reason, when llama.cpp's tools are not built (`nsds assets fetch llama.cpp`) or the assets
are missing. About 20 s on 2 cores: one requantization (~2 s) and three short llama-perplexity runs.
"""

import math
import re

import gguf
import pytest

from nsds import assets, gguf_tools, llamacpp
from nsds.errors import NsdsError

from needs import missing

pytestmark = pytest.mark.integration

# Overrides on SmolLM2-135M (d=576, ffn=1536). llama.cpp checks a type's block size against a tensor's row
# length ne[0], the first number of its GGUF shape: ffn_down is [1536, 576], rows of 1536 = 6 * 256, so q6_K
# applies as asked; attn_q is [576, 576], and 576 is not a multiple of 256, so q4_K falls back (observed: Q5_0;
# llama-quant.cpp's tensor_type_fallback: q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0, which here would hide
# behind the Q8_0 base, hence q4_K).
OVERRIDES = {"blk.0.ffn_down.weight": "q6_K", "blk.0.attn_q.weight": "q4_k"}
EXPECTED_OVERRIDES = {"blk.0.ffn_down.weight": "Q6_K", "blk.0.attn_q.weight": "Q5_0"}


@pytest.fixture(scope="module")
def llama() -> llamacpp.LlamaCpp:
    try:
        return llamacpp.tools()
    except NsdsError as err:
        missing(f"llama.cpp runner test needs the built tools: {err}")


def asset(name: str):
    try:
        return assets.path(name)
    except NsdsError as err:
        missing(f"llama.cpp runner test needs an asset: {err}")


@pytest.fixture(scope="module")
def smollm2(llama):
    return asset("smollm2")


@pytest.fixture(scope="module")
def brown(llama):
    return asset("brown")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_preset_types_are_llama_quantizes_list(llama):
    presets = gguf_tools.presets_of(llama.quantize)
    for name in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"):
        assert name in presets
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "F16", "BF16", "F32"):
        assert name in presets
    assert len(presets) == len(set(presets))
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", name) for name in presets)


def test_requantize_with_per_tensor_types(llama, smollm2, tmp_path):
    target = tmp_path / "out" / "smollm2-mix.gguf"
    gguf_tools.quantize_gguf(smollm2, target, "q8_0", tensor_types=OVERRIDES, threads=2, timeout=120)

    # the overrides file llama-quantize read, kept beside the target; nothing temporary left behind
    assert target.with_suffix(".tensor-types.txt").read_text() == (
        "^blk\\.0\\.ffn_down\\.weight$=Q6_K\n^blk\\.0\\.attn_q\\.weight$=Q4_K\n"
    )
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-mix.gguf", "smollm2-mix.tensor-types.txt"]

    source = gguf_tools.tensor_types_of(smollm2)
    result = gguf_tools.tensor_types_of(target)
    assert result == {t.name: t.tensor_type.name for t in gguf.GGUFReader(target).tensors}  # the slow reader agrees
    assert result.keys() == source.keys() and len(result) == 272
    for name, type_ in result.items():
        if name in EXPECTED_OVERRIDES:
            assert type_ == EXPECTED_OVERRIDES[name], name
        elif name.endswith("norm.weight"):
            # 1-D norms (attn_norm, ffn_norm per block, output_norm): llama.cpp never quantizes them: F32 as read
            assert type_ == source[name] == "F32", name
        else:
            # every matrix, token_embd (Q8_0 in the source, tied output: no output.weight) included, is the base
            assert type_ == "Q8_0", name
    assert sum(t == "F32" for t in result.values()) == 61


def test_unknown_types_are_one_line_and_write_nothing(llama, smollm2, tmp_path):
    target = tmp_path / "never.gguf"
    with pytest.raises(NsdsError) as err:
        gguf_tools.quantize_gguf(smollm2, target, "Q4_K_X")
    message = one_line(err)
    assert "'Q4_K_X'" in message and "Q4_K_M" in message and "Q8_0" in message

    with pytest.raises(NsdsError) as err:
        gguf_tools.quantize_gguf(smollm2, target, "Q8_0", tensor_types={"blk.0.ffn_down.weight": "q4_k_m"})
    message = one_line(err)
    assert "'q4_k_m'" in message and "Q6_K" in message and "Q4_K_M" not in message

    with pytest.raises(NsdsError, match=re.escape("no tensor named 'blk.99.ffn_down.weight'")):
        gguf_tools.quantize_gguf(smollm2, target, "Q8_0", tensor_types={"blk.99.ffn_down.weight": "q6_K"})
    with pytest.raises(NsdsError, match=re.escape("never quantizes 'blk.0.attn_norm.weight'")):
        gguf_tools.quantize_gguf(smollm2, target, "Q8_0", tensor_types={"blk.0.attn_norm.weight": "q8_0"})
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_quantization_keeps_the_old_target(llama, smollm2, tmp_path):
    target = tmp_path / "kept.gguf"
    target.write_bytes(b"an earlier result")
    with pytest.raises(NsdsError) as err:  # Q4_1 tensors, requantizing not allowed: llama-quantize fails
        gguf_tools.quantize_gguf(smollm2, target, "Q8_0", allow_requantize=False, threads=2)
    assert one_line(err) == (
        "llama-quantize failed: requantizing from type q4_1 is disabled (pass allow_requantize=True)"
    )
    assert target.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf"]


def test_perplexity_on_two_chunks_is_deterministic(llama, smollm2, brown):
    runs = [gguf_tools.perplexity_gguf(smollm2, brown, 128, chunks=2, threads=2, max_chars=4000) for _ in range(2)]
    first = runs[0]
    assert math.isfinite(first.ppl) and first.ppl > 1
    assert math.isfinite(first.ppl_stderr) and first.ppl_stderr > 0
    assert (first.chunks, first.context) == (2, 128)
    assert first.seconds > 0
    assert runs[1].ppl == first.ppl and runs[1].ppl_stderr == first.ppl_stderr


def test_perplexity_on_too_little_text_says_so(llama, smollm2, brown):
    with pytest.raises(NsdsError) as err:  # 1000 characters: ~200 tokens, and 2 chunks of 128 need 256
        gguf_tools.perplexity_gguf(smollm2, brown, 128, chunks=2, threads=2, max_chars=1000)
    message = one_line(err)
    assert re.search(r"tokenizes to only \d+ tokens", message) and "raise max_chars" in message
    assert not re.match(r"\d", message.split(": ", 1)[1])  # no log timestamp
