"""models/tensor_files.py under the loader's reading threads (models/checkpoints.py READ_THREADS): tensors read at
once from several threads, converting ones included, are those read one by one."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.tensor_files import _CHUNK_BYTES, open_tensor_file


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["as stored", "converted"])
def test_reads_from_several_threads_at_once_equal_reads_one_by_one(tmp_path: Path, dtype: torch.dtype | None) -> None:
    torch.manual_seed(0)
    # fp16 tensors from a few bytes to several conversion chunks each, so converting reads share the chunk size
    sizes = [1, 7, _CHUNK_BYTES // 2 + 3, _CHUNK_BYTES + 5, 3 * _CHUNK_BYTES // 2] * 4
    stored = {f"t{i}": torch.randn(n).half() for i, n in enumerate(sizes)}
    save_file(stored, str(tmp_path / "m.safetensors"))
    one_by_one = {k: open_tensor_file(tmp_path / "m.safetensors").read(k, dtype) for k in stored}
    file = open_tensor_file(tmp_path / "m.safetensors")  # one file object, read by every thread
    with ThreadPoolExecutor(4) as pool:
        at_once = dict(zip(stored, pool.map(lambda k: file.read(k, dtype), stored), strict=True))
    for k, tensor in stored.items():
        assert at_once[k].dtype == (dtype or torch.float16)
        assert torch.equal(at_once[k], one_by_one[k]) and torch.equal(at_once[k], tensor.to(at_once[k].dtype)), k

