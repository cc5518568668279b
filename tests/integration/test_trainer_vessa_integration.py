"""BCP + VESSA with the real assistant: Ray Serve app (tiny encoder) ⇄ dispatcher process ⇄ Redis ⇄
the trainer's stream link. The trainer survives the assistant going away (fallbacks counted) and uses it
again when it comes back."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from shared.config import load_settings
from shared.wire.stream_client import AsyncStreamClient
from student_trainer.config import TrainSettings
from student_trainer.stream_link import StreamAssistantLink
from student_trainer.train import train
from tests.helpers import start_dispatcher

pytestmark = pytest.mark.slow


def _cfg(synth_dir, out_dir, iters: int, **vessa) -> TrainSettings:
    return load_settings(
        TrainSettings,
        None,
        method="bcp_vessa",
        out_dir=out_dir,
        device="cpu",
        progress=False,
        data={"root": synth_dir, "n_labeled": 3, "image_size": 64},
        batch_size=4,
        labeled_bs=2,
        max_iters=iters,
        val_every=iters,
        save_every=iters,
        log_every=1,
        bcp={"pretrain_iters": 2},
        final_eval=False,
        vessa={"prefetch": 2, "warmup_iters": 2, **vessa},
    )


def _wait_until_the_assistant_answers(redis_url: str, timeout: float = 120.0) -> None:
    """One request through Redis → dispatcher → Serve on a trainer id of its own (so the trainer's counts
    are untouched): returns once a freshly started dispatcher is connected and answering."""

    async def probe():
        client = AsyncStreamClient(redis_url, "probe-trainer", max_in_flight=1)
        await client.start()
        try:
            rid = await client.submit(np.zeros((1, 64, 64), np.uint8), class_ids=[3])
            return await client.result(rid, timeout)
        finally:
            await client.close()

    res = asyncio.run(probe())
    assert res is not None and res.status == "ok", res


def test_bcp_vessa_with_the_real_assistant(serve_app, redis_server, synth_dir, tmp_path):
    disp = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    link = StreamAssistantLink(redis_server.url, "it-trainer", max_in_flight=4)
    try:
        result = train(_cfg(synth_dir, tmp_path / "run", 6, timeout_s=120.0), link=link)
    finally:
        disp.terminate()
        disp.wait(30)
    a = result["assistant"]
    assert a["answered"] == 6 and a["fallbacks"] == 0, a
    assert a["link_client_submitted"] >= 6
    assert (tmp_path / "run" / "latest.pt").is_file()


def test_trainer_survives_the_assistant_going_away_and_coming_back(serve_app, redis_server, synth_dir, tmp_path):
    disp = {"p": start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d1.log")}
    # The assistant is answering before training starts, so every fallback counted below comes from the
    # kill, not from the dispatcher's start-up; this is what lets timeout_s be short (see below).
    _wait_until_the_assistant_answers(redis_server.url)
    link = StreamAssistantLink(redis_server.url, "flaky-trainer", max_in_flight=4, resend_after_s=5.0)
    marks: dict = {}

    def chaos():
        # after a few answers, the assistant's only dispatcher dies: the trainer must fall back …
        deadline = time.monotonic() + 300
        while link.stats()["answered"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        disp["p"].kill()
        disp["p"].wait(10)
        marks["answered_at_kill"] = link.stats()["answered"]
        marks["fallbacks_at_kill"] = link.stats()["fallbacks"]
        while link.stats()["fallbacks"] < marks["fallbacks_at_kill"] + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        marks["fallbacks_seen"] = link.stats()["fallbacks"]
        # … and use the assistant again once a dispatcher is back
        disp["p"] = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d2.log")

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    # Every step without an answer costs timeout_s, so the run's length is mostly fallbacks (15 s each
    # before). The answer for step t is asked for at step t - prefetch (2 steps, ~0.7-1.5 s each on 2 CPU
    # cores), so a live answer has those steps plus 5 s: room for its latency (~1 s, a few s under load).
    # 20 steps: the kill comes after ~3 answered steps, the two fallbacks take ~2 more, which leaves ~13
    # steps (~65 s at timeout_s) for the new dispatcher to start (2-5 s measured) and answer again.
    iters = 20
    try:
        result = train(_cfg(synth_dir, tmp_path / "run", iters, timeout_s=5.0), link=link)
    finally:
        t.join(5)
        disp["p"].terminate()
        disp["p"].wait(60)
    a = result["assistant"]
    assert marks["fallbacks_seen"] - marks["fallbacks_at_kill"] >= 2, marks  # fallbacks caused by the kill
    assert a["fallbacks"] >= 2, a
    assert a["answered"] > marks["answered_at_kill"], (a, marks)  # answers came back after the restart
    assert result["step"] == iters + 2  # training never stopped (+ the 2 pre-training steps)
