"""Test helpers without a fixture, one place for all test packages: the repository root, Serve test
settings, ports and readiness (from services.runtime.net), a bank copy, processes started and stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from services.runtime.net import free_port, free_ports, wait_ready

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "free_port", "free_ports", "wait_ready"]


def copy_bank(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@dataclass
class ServeApp:
    url: str
    gcs_address: str
    bank: Path
    auth_url: str
    token: str


SERVE_TEST_ARGS = {
    "ckpt": "random",
    "encoder": "tiny",
    "device": "cpu",
    "max_batch_slices": 16,
    "batch_wait_timeout_s": 0.01,
    "max_upload_mb": 8,
    "request_timeout_s": 60,
    "cache_device_entries": 512,
}
SMALL = {"ray_actor_options": {"num_cpus": 0}}
# The assistant's replica is health-checked every second here (10 s in the app): Serve learns of a
# replica killed by a test (tests/integration/test_faults_streams.py) at its next health check and only then starts
# a new one, so this bounds how long such a test waits; the check itself is a flag read.
ASSISTANT_TEST_OPTIONS = {**SMALL, "health_check_period_s": 1}


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, 30 s to exit, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_dispatcher(redis_url: str, gcs_address: str, log_path: Path, **env_overrides) -> subprocess.Popen:
    """A real dispatcher process (`vessa dispatcher`) connected to the session's Serve app."""
    env = dict(os.environ)
    env.update({f"VESSA_{k.upper()}": str(v) for k, v in env_overrides.items()})
    env["VESSA_REDIS_URL"] = redis_url
    log = open(log_path, "ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "dispatcher",
            "--redis-url",
            redis_url,
            "--ray-address",
            gcs_address,
        ],
        cwd=str(ROOT),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
