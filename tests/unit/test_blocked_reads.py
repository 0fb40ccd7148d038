"""Bounded memory while scoring: safetensors data read into owned memory (no pages left mapped), W_U read a
block of rows at a time, and its Gram summed over the blocks equal to the Gram of the whole W_U."""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nsds import arch
from nsds.compute import Compute
from nsds.metrics.spectra import gram_block_rows, gram_of_blocks, gram_of_columns, readout_complement
from nsds.scorers.nsds import _readout, _unembedding
from nsds.scorers.streaming import TimedReader
from nsds.weights import SafetensorsSource

from tiny_models import tiny_model

EXTRA = {
    "extra.f64": torch.randn(7, 5, dtype=torch.float64),
    "extra.bf16": torch.randn(9, 4).to(torch.bfloat16),
    "extra.f16": torch.randn(3, 2, 2).to(torch.float16),
    "extra.scalar": torch.tensor(2.5),
    "extra.empty": torch.zeros(0, 4),
    "extra.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
}


@pytest.fixture(scope="module")
def folder(tiny_llama_folder, tmp_path_factory):
    """The tiny Llama plus a second file of odd dtypes and shapes."""
    folder = tmp_path_factory.mktemp("extra")
    for path in tiny_llama_folder.iterdir():
        shutil.copy(path, folder)
    save_file(EXTRA, folder / "extra.safetensors")
    return folder


def test_reads_equal_the_safetensors_library(folder):
    with SafetensorsSource(folder) as source:
        for name in source.names():
            file = "extra.safetensors" if name.startswith("extra.") else "model.safetensors"
            with safe_open(folder / file, framework="pt") as reference:
                expected = reference.get_tensor(name)
            got = source.tensor(name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name


@pytest.mark.parametrize("rows", [1, 2, 4, 100])
def test_row_blocks_are_the_tensor_in_order(folder, rows):
    with SafetensorsSource(folder) as source:
        for name in ("extra.f64", "extra.bf16", "extra.f16", "model.embed_tokens.weight"):
            whole = source.tensor(name)
            blocks = list(source.row_blocks(name, rows))
            assert [len(b) for b in blocks[:-1]] == [rows] * (len(blocks) - 1) and 0 < len(blocks[-1]) <= rows
            assert torch.equal(torch.cat(blocks), whole), name


def test_blocked_gram_is_the_whole_gram():
    w = torch.randn(1000, 24, dtype=torch.float64)
    blocks = (w[i : i + 64] for i in range(0, len(w), 64))
    exact = gram_of_columns(w, torch.float64, block_bytes=64 * 24 * 8, strips=3)
    assert torch.equal(gram_of_blocks(blocks, 24, torch.float64, strips=3), exact)
    assert torch.allclose(torch.tril(exact), torch.tril(w.T @ w), rtol=1e-13, atol=1e-12)


def test_readout_from_blocks_equals_the_unblocked_readout(tmp_path):
    """A vocabulary longer than one block: the readout (complement Q, k_U) from W_U's blocks, read from
    the file, equals bit for bit what the whole W_U gives (gram_of_columns, the computation before blocks)."""
    model = tiny_model("llama", vocab_size=300_000, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    compute = Compute()
    unembedding = model.get_input_embeddings().weight.detach()
    assert len(unembedding) > gram_block_rows(unembedding.shape[1], compute.dtype)  # at least two blocks
    with SafetensorsSource(tmp_path) as source:
        family, geo = arch.family_of("llama"), arch.geometry(source.config)
        name = arch.unembedding_name(family, geo, arch.find_body(family, source.names()), source.names())
        read = TimedReader(source)
        complement, k_u = _readout(_unembedding(read, [name], geo, compute), geo.hidden_size, 0.99, compute)
    expected, expected_k = readout_complement(gram_of_columns(unembedding, torch.float64), 0.99)
    assert k_u == expected_k and torch.equal(complement, expected)
    assert read.seconds > 0
