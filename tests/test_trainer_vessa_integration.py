"""BCP + VESSA with the real assistant: Ray Serve app (tiny encoder) ⇄ dispatcher process ⇄ Redis ⇄
the trainer's stream link. The trainer survives the assistant going away (fallbacks counted) and uses it
again when it comes back."""

from __future__ import annotations

import threading
import time

import pytest

from shared.config import load_settings
from student_trainer.config import TrainSettings
from student_trainer.stream_client import StreamAssistantLink
from student_trainer.train import train
from tests.conftest import start_dispatcher

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
        while link.stats()["fallbacks"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        marks["fallbacks_seen"] = link.stats()["fallbacks"]
        # … and use the assistant again once a dispatcher is back
        disp["p"] = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d2.log")

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    try:
        result = train(_cfg(synth_dir, tmp_path / "run", 30, timeout_s=15.0), link=link)
    finally:
        t.join(5)
        disp["p"].terminate()
        disp["p"].wait(60)
    a = result["assistant"]
    assert marks["fallbacks_seen"] >= 2, marks
    assert a["fallbacks"] >= 2, a
    assert a["answered"] > marks["answered_at_kill"], (a, marks)  # answers came back after the restart
    assert result["step"] == 32  # training never stopped
