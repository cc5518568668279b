"""The assistant's numeric precision: bf16 autocast on a GPU always, on the CPU when asked.

One rule for every place the assistant's model runs (bank building, Stage-1 training, inference), so an
exemplar's embedding and a query's embedding are computed alike. bf16 on the CPU is opt-in: it is about
2x faster where the CPU has native bf16 kernels (AVX512-BF16/AMX), with label maps equal on 99.97% of
pixels (docs/benchmarks.md, "bf16 on the CPU"), and fp32 keeps CPU results identical to earlier runs.
"""

from __future__ import annotations

import torch


def cpu_bf16_fast() -> bool:
    """Whether bf16 on this CPU runs on native kernels (oneDNN's own check: AVX512 or better). Where it
    does not, bf16 autocast can be slower than fp32, so callers that choose for the user ask first."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # a torch build without oneDNN
        return False


def autocast(device: torch.device, cpu_bf16: bool = False) -> torch.autocast:
    """bf16 autocast on a CUDA device; on the CPU only with `cpu_bf16` (otherwise a disabled autocast,
    which at the top level changes nothing)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16 and device.type == "cpu")
