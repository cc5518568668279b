"""Shared fixtures: real parts, started for real (helpers without a fixture live in tests/helpers.py).

- `synth_dir`: the built-in synthetic cardiac dataset (MSD NIfTI layout), small.
- `tiny_bank`: a template bank of its labeled cases, built with the tiny encoder (fast on CPU).
- `serve_app`: a real local Ray instance with the VESSA Serve application on a free port.
- `redis_server`: a real redis-server on a free port (AOF on), per test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import (
    ASSISTANT_TEST_OPTIONS,
    SERVE_TEST_ARGS,
    SMALL,
    ServeApp,
    copy_bank,
    free_port,
    wait_ready,
)

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from shared.data.synth import write_msd_dataset

    out = tmp_path_factory.mktemp("synth")
    write_msd_dataset(out, cases=8, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_bank(synth_dir, tmp_path_factory) -> Path:
    from assistant_server.bank_builder import build_bank

    out = tmp_path_factory.mktemp("bank") / "bank"
    build_bank(synth_dir, 3, out, encoder="tiny", device="cpu")
    return out




@pytest.fixture(scope="session")
def serve_app(tiny_bank, tmp_path_factory):
    """One local Ray + Serve for the whole session: the app at /, a token-protected copy at /secure."""
    import ray
    from ray import serve

    from services.ingress.app import build_app
    from services.labeling.dicomweb import ENV_PASSWORD, ENV_USER
    from tests.orthanc import OrthancServer

    # A REST job's runner actor reads PACS credentials from its environment, which Ray's workers take
    # from the environment Ray was started with (as a deployment sets them on its nodes): the test
    # Orthanc's user, set before ray.init (tests/integration/test_jobs_api.py's DICOMweb job).
    os.environ.setdefault(ENV_USER, OrthancServer.user)
    os.environ.setdefault(ENV_PASSWORD, OrthancServer.password)

    bank = copy_bank(tiny_bank, tmp_path_factory.mktemp("served") / "bank")
    auth_bank = copy_bank(tiny_bank, tmp_path_factory.mktemp("served_auth") / "bank")
    port = free_port()
    # On a loaded 2-core machine the proxy's readiness check (5 s by default) can time out again and
    # again: the controller then kills and restarts the proxy and serve.start fails. The env reaches the
    # controller: this driver starts the local Ray instance.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployments = {"VessaAssistant": dict(ASSISTANT_TEST_OPTIONS), "VessaIngress": dict(SMALL)}
    token = "test-token-" + "x" * 16
    # Both applications deployed at once (their replicas start side by side: ~3 s sooner than one
    # serve.run after the other on 2 cores); run_many waits until both are running, like serve.run.
    serve.run_many(
        [
            serve.RunTarget(build_app({**SERVE_TEST_ARGS, "bank": str(bank)}, deployments), name="vessa", route_prefix="/"),
            serve.RunTarget(
                build_app({**SERVE_TEST_ARGS, "bank": str(auth_bank), "api_token": token}, deployments),
                name="vessa_auth",
                route_prefix="/secure",
            ),
        ]
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    wait_ready(url + "/secure")
    yield ServeApp(url, ray.get_runtime_context().gcs_address, bank, url + "/secure", token)
    # No serve.shutdown() first: it drains every replica gracefully (~5 s), while ray.shutdown() stops
    # this local Ray instance, and with it every Serve actor, at once.
    ray.shutdown()


@pytest.fixture
def redis_server(tmp_path):
    from services.runtime.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()
