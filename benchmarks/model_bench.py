"""The assistant alone: cold and warm pseudo-labels per second, encoder/decoder split, and how cost
grows with slices per request — the figures issue 8 asks of the model side, in one run.

    python -m benchmarks.model_bench [--device cuda] [--batches 1,32,256] [--scaling 1,8,64,512] [--levers 256]
        [--compile] [--json OUT]

cold: every slice is new (encoder + decoder, all classes of a slice in one pass); warm: the slice's
embedding is cached and only a new student prompt arrives (decoder only). Random weights (speed does
not depend on weight values), synthetic 256×256 slices. Also prints the floor: encoder FLOPs per slice
against the device's measured bf16 matrix rate. `--levers B`: the encoder alone at batch B with a pinned
host buffer, as one captured CUDA graph and (with --compile) torch.compile'd; CPU: the baseline row only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ENCODER_GFLOP = 75.0  # LiteMedSAM TinyViT at 256×256 (architecture page)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device) -> float:
    """Measured bf16 (GPU) / fp32 (CPU) matrix rate, the ceiling the floor is computed against."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 10 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def build(work: Path, device: str, encoder: str):
    from assistant_server.assistant import Assistant
    from assistant_server.bank import TemplateBank
    from assistant_server.checkpoint import build_model
    from assistant_server.modeling.foundation import module_state_hash
    from assistant_server.modeling.vessa import VessaConfig
    from shared.data.classes import CARDIAC_CLASSES

    torch.manual_seed(0)
    # eval first: TinyViT's batch norms would otherwise update their running statistics in the encode
    # below, and the bank's encoder hash would no longer match the assistant's (seen on the H200)
    model = build_model(VessaConfig(encoder=encoder), pretrained=False).eval()
    text = np.random.default_rng(0).standard_normal((len(CARDIAC_CLASSES), 384)).astype(np.float32)
    bank = TemplateBank.create(work / "bank", CARDIAC_CLASSES, text, module_state_hash(model.image_encoder), "random")
    # 16 random exemplars with blob labels: template matching costs the same whatever they show
    from assistant_server.bank import Exemplar

    rng = np.random.default_rng(1)
    labels = torch.zeros(16, 256, 256, dtype=torch.uint8)
    for i in range(16):
        cy, cx = rng.integers(80, 176, 2)
        yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        r = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
        labels[i][r < 40] = 2
        labels[i][r < 28] = 3
        labels[i][(r < 50) & (xx < cx - 30)] = 1
    images = torch.rand(16, 256, 256)
    with torch.inference_mode():
        emb = torch.cat([model.encode(images[i : i + 4, None].expand(-1, 3, -1, -1)) for i in range(0, 16, 4)])
    exemplars = [Exemplar(f"r{i}", f"r{i}", f"p{i % 4}", 0, "random", 256, 256) for i in range(16)]
    bank.add(exemplars, images, labels, emb)
    # answer cache off: the scaling rows repeat templates-only slices and must time the decoder
    return Assistant(
        model, TemplateBank(work / "bank"), device=device, cache=None, model_version="random", encode_batch=256,
        answer_cache_entries=0,
    )


def timed(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def encoder_levers(model, device: torch.device, batch: int, reps: int, compile_: bool = False) -> list[dict]:
    """The encoder alone at one fixed batch shape, uint8 slices from the host, with the levers issue 17
    names: eager with a pageable upload (the baseline), a pinned host buffer with a non-blocking upload,
    the whole upload + encoder captured as one CUDA graph, and optionally torch.compile. The levers need
    CUDA: on other devices only the baseline row is timed (the others would be no-ops)."""
    cuda = device.type == "cuda"
    enc = model.image_encoder.eval()
    host = torch.randint(0, 256, (batch, 256, 256), dtype=torch.uint8)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0)[:, None].expand(-1, 3, -1, -1)

    def amp():
        # no autocast weight cache: it does not survive graph capture
        return torch.autocast("cuda", torch.bfloat16, cache_enabled=False) if cuda else contextlib.nullcontext()

    rows = []
    with torch.no_grad(), amp():
        t = timed(lambda: enc(prep(host.to(device))), device, reps)
        rows.append({"lever": "eager, pageable upload", "slices_per_s": batch / t})
        if not cuda:
            return rows
        pinned = host.pin_memory()
        static_in = torch.empty(host.shape, dtype=torch.uint8, device=device)

        def pinned_step() -> torch.Tensor:
            static_in.copy_(pinned, non_blocking=True)
            return enc(prep(static_in))

        t = timed(pinned_step, device, reps)
        rows.append({"lever": "eager, pinned non-blocking upload", "slices_per_s": batch / t})
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                pinned_step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = enc(prep(static_in))
        _sync(device)

        def graph_step() -> torch.Tensor:
            static_in.copy_(pinned, non_blocking=True)
            graph.replay()
            return static_out

        t = timed(graph_step, device, reps)
        rows.append({"lever": "CUDA graph (fixed batch), pinned upload", "slices_per_s": batch / t})
        if compile_:
            compiled = torch.compile(enc, mode="max-autotune-no-cudagraphs", dynamic=False)
            t = timed(lambda: compiled(prep(static_in)), device, reps)
            rows.append({"lever": "torch.compile (fixed batch)", "slices_per_s": batch / t})
    return rows


def run(args) -> dict:
    from assistant_server.assistant import SliceInput
    from assistant_server.embedding_cache import EmbeddingCache

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="vessa-model-bench-"))
    a = build(work, args.device, args.encoder)
    a.cache = EmbeddingCache(device, device_entries=1_000_000)
    rng = np.random.default_rng(2)
    counter = [0]

    def new_slices(n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            counter[0] += 1
            img = rng.integers(0, 255, (256, 256), dtype=np.uint8)
            img[0, 0] = counter[0] % 256
            img[0, 1] = (counter[0] // 256) % 256
            img[0, 2] = (counter[0] // 65536) % 256
            out.append(img)
        return out

    results: dict = {"device": args.device, "encoder": args.encoder, "rows": [], "scaling": []}
    for b in args.batches:
        cold_sl = [new_slices(b) for _ in range(args.reps + 1)]
        it = iter(cold_sl)
        cold = timed(lambda it=it: a.predict([SliceInput(image=s) for s in next(it)]), device, args.reps)
        warm_sl = new_slices(b)
        a.predict([SliceInput(image=s) for s in warm_sl])
        probs = np.full((4, 256, 256), 0.25, np.float32)
        warm = timed(
            lambda sl=warm_sl, p=probs: a.predict([SliceInput(image=s, student_probs=p) for s in sl]), device, args.reps
        )
        enc0 = a.stats()["encoder_s"]
        a.predict([SliceInput(image=s) for s in new_slices(b)])
        enc = a.stats()["encoder_s"] - enc0
        results["rows"].append(
            {"batch": b, "cold_slices_per_s": b / cold, "warm_slices_per_s": b / warm, "encoder_ms_per_slice": 1000 * enc / b,
             "decoder_ms_per_slice": 1000 * warm / b}
        )
    for n in args.scaling:
        sl = new_slices(n)
        a.predict([SliceInput(image=s) for s in sl])
        t = timed(lambda sl=sl: a.predict([SliceInput(image=s) for s in sl]), device, max(1, args.reps // 2))
        results["scaling"].append({"slices_per_request": n, "ms_per_slice_warm": 1000 * t / n})
    if args.levers:
        results["levers_batch"] = args.levers
        results["levers"] = encoder_levers(a.model, device, args.levers, args.reps, args.compile)
    rate = matmul_tflops(device)
    results["matmul_tflops"] = rate
    results["cold_floor_slices_per_s"] = rate * 1e12 / (ENCODER_GFLOP * 1e9)
    per = [r["ms_per_slice_warm"] for r in results["scaling"]]
    results["scaling_spread"] = (max(per) / min(per) - 1) if per else float("nan")
    return results


def table(res: dict) -> str:
    floor = (
        f"cold floor {res['cold_floor_slices_per_s']:.0f} slices/s (LiteMedSAM encoder {ENCODER_GFLOP:.0f} GFLOP/slice)"
        if res["encoder"] == "litemedsam"
        else "no floor: the tiny stand-in encoder"
    )
    lines = [f"assistant alone — {res['device']}, {res['encoder']}; matrix rate {res['matmul_tflops']:.1f} TFLOP/s → {floor}"]
    lines.append(f"{'batch':>6s} {'cold sl/s':>10s} {'warm sl/s':>10s} {'enc ms/sl':>10s} {'dec ms/sl':>10s}")
    for r in res["rows"]:
        lines.append(f"{r['batch']:6d} {r['cold_slices_per_s']:10.1f} {r['warm_slices_per_s']:10.1f} {r['encoder_ms_per_slice']:10.2f} {r['decoder_ms_per_slice']:10.2f}")
    lines.append("slices/request → warm ms per slice: " + ", ".join(f"{s['slices_per_request']}: {s['ms_per_slice_warm']:.2f}" for s in res["scaling"]))
    lines.append(f"spread of time per slice across request sizes: {100 * res['scaling_spread']:.0f}%")
    for r in res.get("levers", []):
        lines.append(f"encoder alone, batch {res['levers_batch']}, {r['lever']}: {r['slices_per_s']:.1f} slices/s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--encoder", default="litemedsam", choices=["litemedsam", "tiny"])
    p.add_argument("--batches", default="1,32,256", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--scaling", default="1,8,64,512", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--levers", type=int, default=0, help="also time the encoder alone at this batch with each lever")
    p.add_argument("--compile", action="store_true", help="with --levers: add a torch.compile row (CUDA)")
    args = p.parse_args(argv)
    res = run(args)
    res["table"] = table(res)
    print(res["table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
