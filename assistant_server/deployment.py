"""`VessaAssistant`: the Ray Serve deployment that hosts the assistant on a GPU (or the CPU).

Calls arrive as (call JSON, binary parts) from the REST ingress or the Redis dispatcher; `@serve.batch`
gathers them into batches counted in *slices* (`batch_size_fn`), so one 16-slice volume and sixteen
single slices fill a batch alike; a call larger than a batch is split and its replies merged. The model
runs in a worker thread so the event loop keeps accepting work (and batches keep filling) meanwhile.
The replica reports healthy only after loading and warming up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import field_validator
from ray import serve

from assistant_server.assistant import Assistant, AssistantInputError
from assistant_server.assistant.options import InferenceOptions
from assistant_server.call_handler import error_reply, serve_calls
from shared.config import VessaSettings
from shared.wire.arrays import WireError
from shared.wire.protocol import AssistCall, AssistReply, Limits, WireSlice, dumps, parse_call

log = logging.getLogger("vessa.assistant")

MODEL_POINTER = "served_model.json"  # beside the bank: the checkpoint every replica serves (use_model)


class AssistantSettings(VessaSettings):
    """Replica settings: Serve application args, overridable by `VESSA_` env vars."""

    ckpt: str = "pretrained"
    bank: Path = Path("bank")
    encoder: str = "litemedsam"
    device: str | None = None
    cache_device_entries: int = 4096
    cache_host_entries: int = 16384
    cache_store: Path | None = None
    max_batch_slices: int = 64
    batch_wait_timeout_s: float = 0.005
    encode_batch: int | None = None  # None: 64 on a GPU, 4 on a CPU (inference.default_encode_batch)
    answer_cache_entries: int = 1024  # templates-only answers kept (inference.py); 0: off
    cpu_bf16: bool = False  # bf16 autocast on a CPU replica (about 2x faster; inference.py)
    torch_threads: int | None = None  # CPU replicas: torch threads per model call (None: leave as is)
    # a replica that serves one batch job (vessa label's embedded default): keep freed memory in the
    # process instead of page-faulting large blocks in again on every call (assistant_server/cpu_memory.py:
    # 2x the eager path's rate on a 2-vCPU EPYC, docs/benchmarks.md); a long-lived server leaves it off
    keep_freed_memory: bool = False
    # the runtime of the frozen encoder and the mask decoder (assistant_server/engines): auto = OpenVINO on a
    # CPU, PyTorch on a GPU; a failing engine falls back to PyTorch with one warning. Converted models are
    # cached on disk. f32 gives the eager path's labels (within 1e-4); bf16 is faster where the CPU has it
    # natively, with labels that differ slightly (docs/benchmarks.md); auto: bf16 where native.
    engine: Literal["auto", "torch", "openvino"] = "auto"
    engine_precision: Literal["auto", "f32", "bf16"] = "f32"
    decoder_precision: Literal["auto", "f32", "bf16"] | None = None  # None: engine_precision
    # InferenceOptions overrides for this replica (e.g. {"refine_below": 0.3}), over the checkpoint's own
    inference: dict = {}

    @field_validator("inference")
    @classmethod
    def _known_inference_options(cls, value: dict) -> dict:
        """Unknown keys and bad values stop the replica at start-up, named, instead of being ignored."""
        known = {f.name for f in dataclasses.fields(InferenceOptions)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown inference option(s) {unknown}: use {sorted(known)}")
        InferenceOptions.from_dict(value)  # raises ValueError on a bad value
        return value
    engine_cache: Path | None = None  # None: ~/.cache/vessa/engines
    warmup: bool = True
    limits: Limits = Limits()


def _node_id() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray (in-process use)
        return None


def _count_slices(items: list[tuple]) -> int:
    return sum(item[2] for item in items)


def split_call(call: AssistCall, blobs: list[bytes], size: int) -> list[tuple[AssistCall, list[bytes]]]:
    """Cut a call into calls of at most `size` slices, each with only its own binary parts."""
    parts = []
    for start in range(0, len(call.slices), size):
        sub_blobs: list[bytes] = []
        sub_slices = []
        for s in call.slices[start : start + size]:
            fields = {}
            for name in ("image", "probs"):
                spec = getattr(s, name)
                if spec is not None:
                    if spec.blob >= len(blobs):
                        raise WireError(
                            f"array refers to binary part {spec.blob}, but the message has {len(blobs)}"
                        )
                    sub_blobs.append(blobs[spec.blob])
                    fields[name] = spec.model_copy(update={"blob": len(sub_blobs) - 1})
            sub_slices.append(WireSlice(hash=s.hash, **fields))
        parts.append((call.model_copy(update={"slices": sub_slices}), sub_blobs))
    return parts


def merge_replies(parts: list[tuple[AssistReply, list[bytes]]]) -> tuple[AssistReply, list[bytes]]:
    """The replies of a split call, as one reply; the first error wins."""
    for reply, blobs in parts:
        if reply.status == "error":
            return reply, blobs
    merged_blobs: list[bytes] = []
    slices = []
    for reply, blobs in parts:
        offset = len(merged_blobs)
        merged_blobs += blobs
        for s in reply.slices:
            update = {}
            for name in ("label", "probs"):
                spec = getattr(s, name)
                if spec is not None:
                    update[name] = spec.model_copy(update={"blob": spec.blob + offset})
            slices.append(s.model_copy(update=update))
    first = parts[0][0]
    return first.model_copy(update={"slices": slices}), merged_blobs


@serve.deployment(
    name="VessaAssistant", max_ongoing_requests=256, health_check_period_s=10, graceful_shutdown_timeout_s=30
)
class VessaAssistant:
    def __init__(self, settings: dict | None = None):
        self.settings = AssistantSettings(**(settings or {}))
        s = self.settings
        if s.keep_freed_memory:
            import torch

            from assistant_server.cpu_memory import keep_freed_memory

            keep_freed_memory(torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        # a checkpoint another replica was told to serve (`use_model`) wins over the configured one
        pointed = self._pointed_model()
        self.assistant = self._build(pointed[0] if pointed else s.ckpt)
        self._pointer_stamp = pointed[1] if pointed else None
        self._model_lock = threading.Lock()  # one model call at a time: batches, segment, templates
        self._batched.set_max_batch_size(s.max_batch_slices)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self._batch_sizes: list[int] = []
        self._batch_hist = np.zeros(12, dtype=np.int64)  # batch sizes in powers of two: 1, 2, 4, …, 2048+
        self._calls = 0
        self._slices = 0
        self._busy_s = 0.0
        self._started = time.time()
        try:
            from ray.serve.metrics import Counter, Histogram

            self._m_batch = Histogram(
                "vessa_batch_slices",
                description="slices per assistant batch",
                boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
            )
            self._m_slices = Counter("vessa_slices_total", description="slices pseudo-labeled")
        except Exception:  # metrics are a nicety; serving must not depend on them
            self._m_batch = self._m_slices = None
        self.ready = False
        if s.warmup:
            self._warmup()
        self.ready = True

    def _build(self, ckpt: str) -> Assistant:
        s = self.settings
        return Assistant.from_files(
            ckpt,
            s.bank,
            device=s.device,
            encoder=s.encoder,
            cache_device_entries=s.cache_device_entries,
            cache_host_entries=s.cache_host_entries,
            cache_store=s.cache_store,
            encode_batch=s.encode_batch,
            answer_cache_entries=s.answer_cache_entries,
            cpu_bf16=s.cpu_bf16,
            engine=s.engine,
            engine_precision=s.engine_precision,
            engine_cache=s.engine_cache,
            decoder_precision=s.decoder_precision,
            options=s.inference,
        )

    # ------------------------------------------------------------------------------ the served model
    # A fine-tuned checkpoint (MONAI Label's POST /train) reaches every replica the way a bank change
    # does: through a file beside the bank they share. `use_model` loads it on the replica it reaches and
    # writes `<bank>/served_model.json`; every replica compares that file's stamp before each model call
    # (one stat) and loads the checkpoint it names when it changed; a replica started later reads it too.
    def _pointer(self) -> Path:
        return Path(self.settings.bank) / MODEL_POINTER

    def _pointed_model(self) -> tuple[str, tuple] | None:
        p = self._pointer()
        try:
            st = p.stat()
            ckpt = json.loads(p.read_text())["ckpt"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (ckpt, (st.st_mtime_ns, st.st_size)) if isinstance(ckpt, str) else None

    def _follow_pointer(self) -> None:
        """Called with the model lock held: load the pointed checkpoint if the pointer changed."""
        try:
            st = self._pointer().stat()
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size) == self._pointer_stamp:
            return
        pointed = self._pointed_model()
        if pointed is None:
            return
        ckpt, stamp = pointed
        self._pointer_stamp = stamp
        if ckpt != self.settings.ckpt:
            try:
                self.assistant = self._build(ckpt)
            except Exception:  # keep serving the model this replica has; said once per pointer change
                log.exception("cannot serve %s named by %s", ckpt, self._pointer())
                return
            log.info("serving %s (written by another replica)", ckpt)
            self.settings.ckpt = ckpt

    async def use_model(self, ckpt: str) -> dict:
        """Serve the checkpoint file `ckpt` on every replica (see above). Returns the new model version,
        or {"error": ...} when the file is not a checkpoint this replica can serve (nothing changes)."""
        from assistant_server.checkpoint import CheckpointError

        path = Path(ckpt)
        if not path.is_absolute() or path.suffix != ".pt" or not path.is_file():
            return {"error": f"{ckpt!r} is not a checkpoint file (an absolute path to a .pt file)"}

        def run():
            assistant = self._build(str(path))  # outside the lock: requests keep being served meanwhile
            with self._model():
                self.assistant = assistant
                self.settings.ckpt = str(path)
                tmp = self._pointer().with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"ckpt": str(path), "model": assistant.model_version}))
                os.replace(tmp, self._pointer())
                self._pointer_stamp = self._pointed_model()[1]
            return assistant.model_version

        try:
            version = await asyncio.to_thread(run)
        except (CheckpointError, ValueError, KeyError) as exc:
            return {"error": f"cannot serve {ckpt}: {type(exc).__name__}: {exc}"}
        return {"model": version}

    async def training_source(self) -> dict:
        """What a fine-tune starts from: the served checkpoint, the bank directory and the encoder."""
        await asyncio.to_thread(self._sync_model)
        return {
            "ckpt": self.settings.ckpt,
            "bank": str(Path(self.settings.bank).resolve()),
            "encoder": self.settings.encoder,
            "model": self.assistant.model_version,
        }

    def _sync_model(self) -> None:
        with self._model():
            pass

    def _warmup(self) -> None:
        """One encoder and decoder pass, so the first request does not pay for lazy initialisation."""
        if len(self.assistant.bank) == 0:
            return
        rng = np.random.default_rng(0)
        image = rng.random((256, 256), dtype=np.float32)
        from assistant_server.assistant import SliceInput

        with self._model():
            self.assistant.predict([SliceInput(image=image)])

    @contextlib.contextmanager
    def _model(self):
        """Hold the model lock, with `torch_threads` applied in the calling thread: model calls run on
        executor threads, and torch's CPU thread count is per thread under OpenMP."""
        with self._model_lock:
            self._follow_pointer()
            want = self.settings.torch_threads
            if want:
                import torch

                if torch.get_num_threads() != want:
                    torch.set_num_threads(want)
            yield

    def reconfigure(self, user_config: dict) -> None:
        """Serve `user_config`: batch size, wait time and CPU threads change without a restart (the
        demo gives the replica one core while the student trains beside it, both cores otherwise)."""
        if "torch_threads" in user_config:
            n = user_config["torch_threads"]
            self.settings.torch_threads = None if n is None else max(1, int(n))
        if "max_batch_slices" in user_config:
            self.settings.max_batch_slices = int(user_config["max_batch_slices"])
            self._batched.set_max_batch_size(self.settings.max_batch_slices)
        if "batch_wait_timeout_s" in user_config:
            self._batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def check_health(self) -> None:
        if not self.ready:
            raise RuntimeError("assistant is not warmed up yet")

    # ------------------------------------------------------------------------------------------ calls
    async def assist(self, meta: bytes | str, blobs: list[bytes]) -> tuple[bytes, list[bytes]]:
        """One call (see shared.wire.protocol) → (reply JSON, binary parts). Never raises for bad input."""
        try:
            call = parse_call(meta)
        except WireError as exc:
            reply, out = error_reply(str(exc), "bad_request", self.assistant)
            return dumps(reply), out
        limit = self.settings.limits.max_slices
        if len(call.slices) > limit:  # before splitting: each part alone would pass decode_slices' check
            reply, out = error_reply(
                f"{len(call.slices)} slices in one call, at most {limit}", "bad_request", self.assistant
            )
            return dumps(reply), out
        size = self.settings.max_batch_slices
        if len(call.slices) <= size:
            return await self._batched((meta, blobs, len(call.slices)))
        try:
            parts = split_call(call, blobs, size)
        except WireError as exc:
            reply, out = error_reply(str(exc), "bad_request", self.assistant)
            return dumps(reply), out
        answers = await asyncio.gather(*[self._batched((dumps(c), b, len(c.slices))) for c, b in parts])
        reply, out = merge_replies([(AssistReply.model_validate_json(m), b) for m, b in answers])
        return dumps(reply), out

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_count_slices)
    async def _batched(self, items: list[tuple]) -> list[tuple[bytes, list[bytes]]]:
        n = sum(item[2] for item in items)
        t0 = time.perf_counter()
        replies = await asyncio.to_thread(self._serve_locked, [(m, b) for m, b, _ in items])
        self._busy_s += time.perf_counter() - t0
        self._calls += len(items)
        self._slices += n
        self._batch_hist[min(int(np.log2(max(n, 1))), len(self._batch_hist) - 1)] += 1
        if self._m_batch is not None:
            self._m_batch.observe(n)
            self._m_slices.inc(n)
        return [(dumps(r), b) for r, b in replies]

    def _serve_locked(self, items):
        with self._model():
            return serve_calls(self.assistant, items, self.settings.limits)

    async def segment(
        self, image: np.ndarray, class_id: int, points=None, point_labels=None, box=None, mask=None
    ) -> dict:
        """Prompt-to-mask for one image (arrays validated by the ingress). Returns mask + confidence
        or {"error": message} for input the assistant cannot use."""

        def run():
            with self._model():
                return self.assistant.segment(image, class_id, points, point_labels, box, mask)

        try:
            mask_out, conf = await asyncio.to_thread(run)
        except AssistantInputError as exc:
            return {"error": str(exc)}
        return {"mask": mask_out.astype(np.uint8), "confidence": conf}

    # ------------------------------------------------------------------------------------------ bank
    async def templates(self) -> dict:
        bank = self.assistant.bank
        bank.refresh()
        return {
            "version": bank.version,
            "classes": [c.__dict__ for c in bank.classes],
            "templates": [e.__dict__ for e in bank.exemplars],
        }

    async def add_templates(
        self, images: np.ndarray, labels: np.ndarray, classes: list[dict], case_id: str, patient_id: str
    ) -> dict:
        """images: (D, H, W) float; labels: (D, H, W) uint8. Every slice with foreground becomes an
        exemplar. Returns the new version and ids, or {"error": ...}."""
        from assistant_server.bank import BankError, Exemplar, same_class_table
        from assistant_server.bank_builder import encode_exemplars, exemplar_id, resize_label
        from shared.data.classes import classes_from_json

        bank = self.assistant.bank
        try:
            if not same_class_table(classes_from_json(classes), bank.classes):
                raise BankError(
                    f"class table {[(c['index'], c['name']) for c in classes]} differs from the bank's "
                    f"{[(c.index, c.name) for c in bank.classes]}"
                )
            if labels.max() >= len(bank.classes):
                raise BankError(f"label values must be < {len(bank.classes)}")
            keep = [i for i in range(labels.shape[0]) if labels[i].any()]
            if not keep:
                raise BankError("the label map has no foreground: nothing to add")
            ids = [exemplar_id(case_id, i) for i in keep]

            def run():
                import torch

                with self._model():
                    # the replica's own precision: templates and queries encoded alike
                    x, emb = encode_exemplars(
                        self.assistant.model,
                        [images[i] for i in keep],
                        self.assistant.device,
                        self.assistant.cpu_bf16,
                    )
                    lab = torch.stack([resize_label(labels[i]) for i in keep])
                    exemplars = [
                        Exemplar(
                            id=eid,
                            case_id=case_id,
                            patient_id=patient_id,
                            slice_index=i,
                            source="api",
                            height=int(images.shape[1]),
                            width=int(images.shape[2]),
                        )
                        for eid, i in zip(ids, keep)
                    ]
                    return bank.add(exemplars, x, lab, emb)

            version = await asyncio.to_thread(run)
        except BankError as exc:
            return {"error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:  # a malformed class table
            return {"error": f"malformed class table: {type(exc).__name__}: {exc}"}
        return {"version": version, "added": ids}

    async def remove_template(self, exemplar_id: str) -> dict:
        from assistant_server.bank import BankError

        try:
            version = await asyncio.to_thread(self.assistant.bank.remove, [exemplar_id])
        except BankError as exc:
            return {"error": str(exc)}
        return {"version": version, "removed": exemplar_id}

    # ------------------------------------------------------------------------------------------ info
    async def info(self) -> dict:
        await asyncio.to_thread(self._sync_model)
        ctx = serve.get_replica_context()
        st = self.assistant.stats()
        up = time.time() - self._started
        return {
            "model": self.assistant.model_version,
            "encoder": self.settings.encoder,
            "bank_version": self.assistant.bank.version,
            "bank_size": len(self.assistant.bank),
            "classes": [c.__dict__ for c in self.assistant.classes],
            "device": str(self.assistant.device),
            "replica": ctx.replica_id.unique_id if hasattr(ctx, "replica_id") else str(os.getpid()),
            "node_id": _node_id(),  # which Ray node answered (multi-node tests, `docker compose` workers)
            "ready": self.ready,
            "max_batch_slices": self.settings.max_batch_slices,
            "torch_threads": self.settings.torch_threads,
            "calls": self._calls,
            "slices": self._slices,
            "slices_per_s": self._slices / up if up > 0 else 0.0,
            "busy_fraction": self._busy_s / up if up > 0 else 0.0,
            "batch_size_histogram": {str(2**i): int(v) for i, v in enumerate(self._batch_hist)},
            "stats": st,
        }
