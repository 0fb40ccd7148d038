"""RowFile: tensors kept on disk by position come back exactly, in any dtype, and leave nothing behind."""

import pytest
import torch

from nsds.spill import RowFile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_come_back_exactly_in_any_order(tmp_path, dtype):
    rows = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(4)]
    spilled = RowFile(tmp_path / "rows.bin", 4, (3, 5), dtype)
    for i in (2, 0, 3, 1):
        spilled.write(i, rows[i])
    assert (tmp_path / "rows.bin").stat().st_size == 4 * 3 * 5 * dtype.itemsize
    assert all(torch.equal(spilled.read(i), rows[i]) and spilled.read(i).dtype == dtype for i in (3, 1, 0, 2))
    spilled.write(1, rows[0])  # a row can be written again
    assert torch.equal(spilled.read(1), rows[0])
    spilled.close()
    assert list(tmp_path.iterdir()) == []


def test_a_row_never_written_or_out_of_range_or_of_another_shape_is_an_error(tmp_path):
    spilled = RowFile(tmp_path / "rows.bin", 3, (2, 2), torch.float32)
    spilled.write(0, torch.ones(2, 2))
    with pytest.raises(OSError, match=r"row 2 of .* was never written"):
        spilled.read(2)
    with pytest.raises(IndexError):
        spilled.read(3)
    with pytest.raises(IndexError, match=r"row 0 of shape \(4,\) does not fit"):
        spilled.write(0, torch.ones(4))
    spilled.close()
    spilled.close()  # closing twice is harmless
