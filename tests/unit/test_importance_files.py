"""Importance matrix files as llama-quantize reads them: llama-imatrix's GGUF format (sums and counts per
tensor, per expert), its legacy .dat format, and the errors for files that are neither or were made for
another model. The files here are written by the gguf package's writer in llama-imatrix's layout; the
real llama-imatrix's output is read in tests/integration/test_importance.py."""

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nsds import importance, selftext
from nsds.errors import NsdsError
from nsds.gguf_header import GGUFHeader


def _imatrix_gguf(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], metadata: bool = True) -> Path:
    """A file as llama-imatrix writes it: NAME.in_sum2 (matrices x columns) and NAME.counts (matrices x 1),
    F32, with its datasets, chunk count and chunk size."""
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    if metadata:
        writer.add_array("imatrix.datasets", ["self.txt"])
        writer.add_uint32("imatrix.chunk_count", 4)
        writer.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        writer.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _imatrix_dat(path: Path, entries: dict[str, tuple[np.ndarray, int]]) -> Path:
    """The legacy format: entry count, then per entry its name, calls, value count and values (float32)."""
    data = struct.pack("<i", len(entries))
    for name, (values, calls) in entries.items():
        encoded = name.encode()
        data += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", calls, values.size)
        data += values.astype(np.float32).tobytes()
    path.write_bytes(data + struct.pack("<i", 4))  # the optional trailing chunk count
    return path


def test_gguf_weights_are_sums_over_counts_as_llama_quantize_computes(tmp_path):
    sums = np.array([[2.0, 4.0, 6.0]], dtype=np.float32)
    experts = np.array([[1.0, 2.0], [3.0, 9.0]], dtype=np.float32)
    entries = {"blk.0.attn_q.weight": (sums, np.array([4.0])),
               "blk.0.ffn_up_exps.weight": (experts, np.array([0.0, 3.0]))}  # fmt: skip
    path = _imatrix_gguf(tmp_path / "m.gguf", entries)
    matrix = importance.read(path)
    assert not matrix.legacy
    assert np.array_equal(matrix.weights("blk.0.attn_q.weight"), np.array([[0.5, 1.0, 1.5]], dtype=np.float32))
    # an expert that saw no token gets weights of 1, as llama-quantize gives it
    assert np.array_equal(matrix.weights("blk.0.ffn_up_exps.weight"), np.array([[1, 1], [1, 3]], dtype=np.float32))
    assert matrix.counts["blk.0.ffn_up_exps.weight"].tolist() == [0, 3]
    weights = matrix.for_modules({"model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight"},
                                 {"model.layers.0.self_attn.q_proj": 3})  # fmt: skip
    assert torch.equal(weights["model.layers.0.self_attn.q_proj"], torch.tensor([0.5, 1.0, 1.5]))


def test_legacy_weights_are_sums_over_calls(tmp_path):
    path = _imatrix_dat(tmp_path / "m.dat", {"blk.0.ffn_down.weight": (np.array([3.0, 6.0]), 3)})
    matrix = importance.read(path)
    assert matrix.legacy
    assert np.array_equal(matrix.weights("blk.0.ffn_down.weight"), np.array([[1.0, 2.0]], dtype=np.float32))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.write_bytes(b"\x00" * 3), p)[1], "is not an importance matrix llama-quantize reads"),
        (lambda p: (p.write_bytes(struct.pack("<ii", 1, 400) + b"name"), p)[1], "runs past the end of the file"),
        (lambda p: _imatrix_gguf(p, {"a.weight": (np.ones((1, 2)), np.ones(1))}, metadata=False),
         "has no imatrix.datasets"),
        (lambda p: _imatrix_gguf(p, {"a.weight": (np.ones((1, 3)), np.ones(2))}), "has 3 sums for 2 counts"),
    ],
)  # fmt: skip
def test_a_file_that_is_no_importance_matrix_is_one_line(tmp_path, make, message):
    with pytest.raises(NsdsError, match=message) as err:
        importance.read(make(tmp_path / "m.imatrix"))
    assert "\n" not in str(err.value)


def test_a_matrix_for_another_model_is_one_line(tmp_path):
    matrix = importance.read(_imatrix_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (np.ones((1, 4)),
                                                                                         np.ones(1))}))  # fmt: skip
    with pytest.raises(NsdsError, match=r"has no entry for blk.0.attn_k.weight \(k\): it was made for another model"):
        matrix.for_modules({"k": "blk.0.attn_k.weight"}, {"k": 4})
    with pytest.raises(NsdsError, match=r"holds 4 values for blk.0.attn_q.weight, whose rows have 8"):
        matrix.for_modules({"q": "blk.0.attn_q.weight"}, {"q": 8})


def _vocabulary(path: Path, add_bos: bool | None, bos: int | None = 1) -> GGUFHeader:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "hello"])
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return GGUFHeader(path)


def test_the_model_starts_its_own_text_from_its_bos_token(tmp_path):
    assert selftext.start_prompt(_vocabulary(tmp_path / "a.gguf", add_bos=True)) == ""  # the vocabulary adds it
    assert selftext.start_prompt(_vocabulary(tmp_path / "b.gguf", add_bos=False)) == "<s>"
    assert selftext.start_prompt(_vocabulary(tmp_path / "c.gguf", add_bos=None, bos=None)) == "</s>"  # EOS


@pytest.mark.parametrize("tokens", [0, 1023, True, 2.5])
def test_too_little_own_text_is_refused(tokens):
    with pytest.raises(NsdsError, match=r"at least 1024 tokens \(two sequences of 512\)"):
        importance.check_tokens(tokens)
