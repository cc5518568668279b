"""A real Orthanc PACS for tests, with its DICOMweb plugin, started on free loopback ports with a
temporary configuration and storage (as the tests start redis-server), and stopped after.

Debian: `apt-get install orthanc orthanc-dicomweb` (scripts/bootstrap.sh installs both)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.runtime.net import free_ports

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def find_orthanc() -> str:
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if exe is None or not DICOMWEB_PLUGIN.exists():
        raise RuntimeError("Orthanc with its DICOMweb plugin is needed: apt-get install orthanc orthanc-dicomweb")
    return exe


@dataclass
class OrthancServer:
    run_dir: Path
    user: str = "vessa"
    password: str = "pacs-secret-4d1f"
    proc: subprocess.Popen | None = None
    http_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> OrthancServer:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # a port chosen beforehand (a service's VESSA_DICOMWEB_ALLOWED names it), else a free one
        ports = free_ports(2)
        self.http_port = self.http_port or ports[0]
        dicom_port = next(p for p in ports if p != self.http_port)
        config = {
            "Name": "VESSA-TEST",
            "StorageDirectory": str(self.run_dir / "storage"),
            "IndexDirectory": str(self.run_dir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": dicom_port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
            "StorageCompression": False,
        }
        cfg = self.run_dir / "orthanc.json"
        cfg.write_text(json.dumps(config))
        log = open(self.run_dir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([find_orthanc(), str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {(self.run_dir / 'orthanc.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", auth=(self.user, self.password), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
