"""Training-step throughput of each method (and validation time), on real or synthetic data.

    python -m student_trainer.benchmark --methods supervised,mean_teacher,bcp_pretrain,bcp,bcp_vessa \\
        --iters 100 --image-size 256 --batch-size 24 [--data DIR] [--compile] [--step graph] [--json OUT]

Without --data a synthetic dataset is generated in a temporary directory. `bcp_pretrain` times BCP's
pre-training step, `bcp` its self-training step. `bcp_vessa` runs against `LoopbackLink`, an in-process
stand-in that answers at once (so the timing covers the trainer's side: the prompt, its transfer to the
host, the fusion and the geometric re-posing, not a real assistant). Also
reports the largest-connected-component cleaning of a batch of teacher labels on both backends.
`--step graph` times the graph-ready step (`student_trainer.static_step`): captured as a CUDA graph on
CUDA, the same sync-free code run eagerly elsewhere (its op count is then the graph's kernel count).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.components import largest_connected_component
from shared.config import load_settings
from student_trainer.assistant_link import PseudoLabelRequest, PseudoLabelResult
from student_trainer.config import TrainSettings


class LoopbackLink:
    """An `AssistantLink` answering at once with an all-background label map: a stand-in whose own cost
    is nil, so a timing shows the trainer's side (prompts, transfers, fusion, re-posing)."""

    def __init__(self, num_classes: int = 4) -> None:
        self.num_classes = num_classes
        self.pending: dict[str, PseudoLabelRequest] = {}
        self.count = 0

    def submit(self, request: PseudoLabelRequest) -> str:
        self.count += 1
        rid = str(self.count)
        self.pending[rid] = request
        return rid

    def result(self, request_id: str, timeout: float) -> PseudoLabelResult | None:
        req = self.pending.pop(request_id, None)
        if req is None:
            return None
        b = req.images.shape[0]
        labels = np.zeros(req.images.shape, np.uint8)
        return PseudoLabelResult(labels=labels, confidence=np.full((b, self.num_classes), 0.8, np.float32))

    def stats(self) -> dict:
        return {"submitted": self.count}

    def close(self) -> None:
        self.pending.clear()


# aten ops that make the host wait for the device: a scalar read back (`.item()`, `float(t)`), a
# whole-tensor comparison, a non-zero search (its output size)
_SYNC_OPS = {"_local_scalar_dense", "equal", "nonzero"}


def count_ops(step: Callable[[], Any]) -> dict[str, Any]:
    """Run `step()` once under a dispatch mode that counts aten ops: on a GPU nearly every counted op
    (views and metadata ops aside) is a kernel launch, so the count tracks the launch overhead of a
    launch-bound step, and it can be taken on the CPU. Host syncs: the ops of `_SYNC_OPS`, plus
    `.to("cpu")` / `.cpu()` of a tensor on another device (on the CPU those are no copies, so they are not
    counted there; an in-place `copy_` into a host tensor is not counted either).
    Note: on the CPU, SGD defaults to one op per tensor (foreach=False); on CUDA it is fused."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()
    syncs: Counter[str] = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            counts[name] += 1
            if name in _SYNC_OPS:
                syncs[name] += 1
            elif name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
                dst = (kwargs or {}).get("device")
                if args[0].device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                    syncs["to_host"] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        step()
    return {
        "ops_per_it": sum(counts.values()),
        "syncs_per_it": sum(syncs.values()),
        "sync_ops": dict(syncs),
        "top_ops": dict(counts.most_common(12)),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_method(
    name: str,
    data: Path,
    iters: int,
    warmup: int,
    image_size: int,
    batch_size: int,
    compile_: bool,
    device: str,
    profile: bool = False,
    assistant: str = "loopback",
    assistant_encoder: str = "litemedsam",
    lcc_backend: str = "auto",
    step: str = "eager",
    cuda_graph: bool = True,
) -> dict[str, Any]:
    from student_trainer.methods import get_method as trainer_method
    from student_trainer.train import Trainer

    method = "bcp" if name == "bcp_pretrain" else name
    overrides: dict[str, Any] = {
        "method": method,
        "device": device,
        "progress": False,
        "compile": compile_,
        "out_dir": Path(tempfile.mkdtemp(prefix=f"bench_{name}_")),
        "data": {"root": data, "n_labeled": 3, "image_size": image_size},
        "batch_size": batch_size,
        "labeled_bs": batch_size // 2,
        "max_iters": warmup + iters + 21,  # + the counted step and the profiled steps
        "bcp": {
            "pretrain_iters": warmup + iters + 21 if name == "bcp_pretrain" else 0,
            "lcc_backend": lcc_backend,
        },
        "vessa": {"warmup_iters": 0, "prefetch": 4, "timeout_s": 1.0},
        "mean_teacher": {"consistency_start": 0},
        "step": {"mode": step, "cuda_graph": cuda_graph},
    }
    cfg = load_settings(TrainSettings, None, **overrides)
    link = None
    if trainer_method(method).uses_assistant:
        link = LoopbackLink() if assistant == "loopback" else _inprocess_link(data, device, assistant_encoder)
    trainer = Trainer(cfg, link=link)
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    trainer.model.train()
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    _sync(dev)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        _, losses, _ = trainer.train_step()
    _sync(dev)
    elapsed = time.perf_counter() - t0
    loss = float(losses["loss"].detach())
    # a replayed CUDA graph dispatches no ops: count the graph-ready step run uncaptured (the same
    # kernels the graph holds)
    captured = trainer.static is not None and trainer.static.capture
    if captured:
        trainer.static.capture = False
    ops = count_ops(trainer.train_step)
    if captured:
        trainer.static.capture = True
    _sync(dev)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(20):
                trainer.train_step()
            _sync(dev)
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(f"--- profile of 20 {name} steps, by {sort} ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        )
    t0 = time.perf_counter()
    trainer._validate(trainer.phases[-1])
    _sync(dev)
    t_val = time.perf_counter() - t0
    out: dict[str, Any] = {
        "method": name,
        "iters": iters,
        "it_per_s": iters / elapsed,
        "ms_per_it": 1000 * elapsed / iters,
        "warmup_s": t_warm,
        "validation_s": t_val,
        "val_volumes": len(trainer.val.volumes),
        "last_loss": loss,
        **ops,
    }
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if trainer.vessa is not None:
        out["assistant"] = trainer.vessa.summary()
        trainer.vessa.close()
    if trainer.static is not None:
        out["graph_step"] = trainer.static.summary()
        if trainer.static.link is not None:
            trainer.static.link.close()
    return out


def bench_lcc(device: str, batch: int = 12, size: int = 256, repeats: int = 10) -> dict[str, Any]:
    """Both LCC backends on blob-like label maps (smoothed noise): equal kept sizes, and timings."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    seg = (ndimage.gaussian_filter(rng.random((batch, size, size)), 6) * 200).astype(np.int64) % 4
    dev = torch.device(device)
    x = torch.from_numpy(seg).to(dev)
    out: dict[str, Any] = {}
    results = {}
    for backend in ("scipy", "torch"):
        largest_connected_component(x, 4, backend)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            y = largest_connected_component(x, 4, backend)
        _sync(dev)
        out[f"{backend}_ms"] = 1000 * (time.perf_counter() - t0) / repeats
        results[backend] = y.cpu().numpy()
    sizes = [
        np.bincount(r.reshape(batch, -1)[i], minlength=4) for r in results.values() for i in range(batch)
    ]
    out["backends_agree"] = bool(
        all(np.array_equal(a, b) for a, b in zip(sizes[:batch], sizes[batch:], strict=True))
    )
    return out


def _inprocess_link(data: Path, device: str, encoder: str = "litemedsam"):
    """A real assistant (LiteMedSAM released weights, untrained head) sharing the trainer's device."""
    from assistant_server.bank_builder import build_bank
    from student_trainer.inprocess_link import InProcessAssistantLink

    dev = None if device == "auto" else device
    bank = Path(tempfile.mkdtemp(prefix="bench_bank_")) / "bank"
    build_bank(data, 3, bank, encoder=encoder, device=dev)
    return InProcessAssistantLink(
        "pretrained" if encoder == "litemedsam" else "random", str(bank), device=dev, encoder=encoder
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="supervised,mean_teacher,bcp_pretrain,bcp,bcp_vessa")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--cases", type=int, default=12, help="synthetic cases when --data is not given")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", default="", help="comma-separated methods to profile (torch.profiler)")
    p.add_argument(
        "--assistant",
        default="loopback",
        choices=["loopback", "inprocess"],
        help="bcp_vessa against an instant stand-in (the trainer's own cost) or a real in-process assistant",
    )
    p.add_argument("--assistant-encoder", default="litemedsam", choices=["litemedsam", "tiny"])
    p.add_argument(
        "--lcc-backend",
        default="auto",
        choices=["auto", "scipy", "torch"],
        help="BCP's connected-component cleaning; torch on a CPU counts the ops a GPU step launches",
    )
    p.add_argument(
        "--step",
        default="eager",
        choices=["eager", "graph"],
        help="the eager step or the graph-ready one (student_trainer.static_step; captured on CUDA)",
    )
    p.add_argument("--no-cuda-graph", action="store_true", help="graph-ready step without capture")
    args = p.parse_args(argv)

    data = args.data
    if data is None:
        from shared.data.synth import write_msd_dataset

        data = Path(tempfile.mkdtemp(prefix="bench_synth_"))
        write_msd_dataset(data, cases=args.cases, seed=0)
    report: dict[str, Any] = {
        "device": args.device,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "compile": args.compile,
        "assistant": args.assistant,
        "step": args.step,
        "methods": [],
    }
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    dev = "cpu" if dev == "auto" else dev
    # the LCC micro-benchmark at the run's own sizes (half the batch: one labeled or unlabeled half)
    report["lcc"] = bench_lcc(
        dev, batch=max(1, args.batch_size // 2), size=args.image_size, repeats=3 if args.iters < 10 else 10
    )
    print(json.dumps({"lcc": report["lcc"]}), flush=True)
    for name in args.methods.split(","):
        r = bench_method(
            name,
            data,
            args.iters,
            args.warmup,
            args.image_size,
            args.batch_size,
            args.compile,
            args.device,
            profile=name in args.profile.split(","),
            assistant=args.assistant,
            assistant_encoder=args.assistant_encoder,
            lcc_backend=args.lcc_backend,
            step=args.step,
            cuda_graph=not args.no_cuda_graph,
        )
        print(json.dumps(r), flush=True)
        report["methods"].append(r)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
