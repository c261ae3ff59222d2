"""A dtype that makes a CPU run slower than fp32 is said, not silently slow: fp16 (the CPU path leaves it unoptimised)
and bf16 on a CPU that would only emulate it. models.cpu_inference reads the CPU's flags, and resolve_model (behind
`ldm generate --dtype` and `LDM_WORKER_DTYPE`) logs the warning.
A CPU without bf16 cannot be had on demand, so these tests write the flags into a cpuinfo file of their own."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from models import resolve
from models.cpu_inference import cpu_dtype_warning, cpu_has_bf16

ZEN4 = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"
SKYLAKE = "flags\t\t: fpu sse avx2 avx512f avx512bw\n"


def _cpuinfo(tmp_path: Path, text: str, name: str = "cpuinfo") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "native"), [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True),
                                              (SKYLAKE, False)])
def test_flags_tell_native_bf16(tmp_path: Path, text: str, native: bool) -> None:
    assert cpu_has_bf16(_cpuinfo(tmp_path, text)) is native


def test_warning_for_fp16_and_for_bf16_on_a_cpu_without_it(tmp_path: Path) -> None:
    cpu, skylake, zen4 = torch.device("cpu"), _cpuinfo(tmp_path, SKYLAKE), _cpuinfo(tmp_path, ZEN4, "zen4")
    warning = cpu_dtype_warning(cpu, torch.bfloat16, skylake)
    assert warning is not None and "slower than fp32" in warning and str(skylake) in warning
    assert cpu_dtype_warning(cpu, torch.float32, skylake) is None
    fp16 = cpu_dtype_warning(cpu, torch.float16, zen4)  # whatever the flags: the CPU path does not optimise fp16
    assert fp16 is not None and "fp16" in fp16 and "slower than fp32" in fp16
    assert cpu_dtype_warning(cpu, torch.bfloat16, zen4) is None
    assert cpu_dtype_warning(torch.device("meta"), torch.bfloat16, skylake) is None  # not a CPU run
    assert cpu_dtype_warning(cpu, torch.bfloat16, tmp_path / "missing") is None  # cannot tell: no guess
    assert cpu_has_bf16(tmp_path / "missing") is None


def test_resolve_model_logs_the_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    skylake = _cpuinfo(tmp_path, SKYLAKE)
    monkeypatch.setattr(resolve, "cpu_dtype_warning",
                        lambda device, dtype: cpu_dtype_warning(device, dtype, skylake))
    with caplog.at_level(logging.WARNING, logger="models.resolve"):
        model = resolve.resolve_model("tiny-shapes", device=torch.device("cpu"), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert any("bf16 asked for on a CPU without bf16 instructions" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.resolve"):
        resolve.resolve_model("tiny-shapes", device=torch.device("cpu"), dtype=torch.float32)
    assert not any("bf16" in r.getMessage() for r in caplog.records)
