"""What every OpenVINO model of ours shares: one Core per process, the precision hint, compiling a
cached IR for the CPU. The encoder (openvino_encoder.py) and the mask decoder (openvino_decoder.py)
are converted from their PyTorch modules, stored in the engine cache and compiled here."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from assistant_server.engines.cache import (
    EngineCacheError,
    atomic_entry,
    default_cache_dir,
    entry_name,
    remove_entry,
    verify_entry,
    write_meta,
)

PRECISIONS = ("auto", "f32", "bf16")

_CORE = None
_CORE_LOCK = threading.Lock()


def native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX): without it a bf16 hint is emulated
    and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """'auto' → bf16 where the CPU has it natively, else f32; an explicit hint is kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r}: use one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if native_bf16() else "f32"
    return precision


def core():
    """One OpenVINO Core per process (it owns the CPU plugin and its thread pools)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino as ov

            _CORE = ov.Core()
        return _CORE


def compile_ir(xml: Path, precision: str, threads: int):
    """The IR at `xml` compiled for the CPU with this precision hint and thread count (latency mode:
    one request at a time, all threads on it)."""
    c = core()
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": int(threads),
        "PERFORMANCE_HINT": "LATENCY",
    }
    return c.compile_model(c.read_model(str(xml)), "CPU", config)


def load_or_convert(
    key: dict,
    xml_name: str,
    convert: Callable[[Path], None],
    precision: str,
    threads: int,
    cache_dir: str | Path | None = None,
) -> tuple[Path, object, bool]:
    """The cache entry named by `key` compiled for the CPU; `convert(entry)` writes it first where it
    is missing. Returns (entry, compiled model, whether it was converted now). An entry that fails its
    check or its compile is removed, so the next start converts again instead of failing again."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = root / entry_name(**key)
    converted = not (entry / "meta.json").is_file()
    if converted:
        convert(entry)
    try:
        verify_entry(entry)
        return entry, compile_ir(entry / xml_name, precision, threads), converted
    except Exception as exc:
        remove_entry(entry)
        if isinstance(exc, EngineCacheError):
            raise
        raise EngineCacheError(f"engine cache entry {entry} could not be loaded: {exc}") from exc


def save_ir(ov_model, entry: Path, key: dict, xml_name: str) -> None:
    """Write a converted model as a new cache entry, atomically: the IR in fp32 (the precision is a
    compile-time hint, so one entry serves every precision) and meta.json with the key and hashes."""
    import openvino as ov

    with atomic_entry(entry) as tmp:
        ov.save_model(ov_model, str(tmp / xml_name), compress_to_fp16=False)
        write_meta(tmp, key, [xml_name, str(Path(xml_name).with_suffix(".bin"))])
