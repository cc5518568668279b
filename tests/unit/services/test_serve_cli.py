"""`vessa serve` as a new user meets it: replicas the cluster cannot place fail fast with a clear message;
Ctrl-C and SIGTERM while it waits for replicas stop it cleanly. Plus the placement rules themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from services.cli.serve import application_options, load_serve_config
from services.runtime.placement import PlacementError, check_placement, replica_bounds
from tests.helpers import ROOT, free_port

CPU_CONFIG = ROOT / "deploy" / "serve_cpu.yaml"
GPU_CONFIG = ROOT / "deploy" / "serve_gpu.yaml"
TWO_CORES = [{"CPU": 2.0, "memory": 1e10, "object_store_memory": 1e9, "node:127.0.0.1": 1.0}]


def _deployments(config, replicas=None, gpus=None) -> dict:
    return application_options(load_serve_config(config), {}, replicas, gpus)[1]


# ---------------------------------------------------------------------------------------------- the rules
def test_two_cpu_replicas_and_the_ingress_do_not_fit_two_cores():
    with pytest.raises(PlacementError) as err:
        check_placement(_deployments(CPU_CONFIG, replicas=2), TWO_CORES, config_name="deploy/serve_cpu.yaml", local=True)
    msg = str(err.value)
    assert "2 VessaAssistant replica(s) x {CPU 1}" in msg and "1 VessaIngress replica(s) x {CPU 0.5}" in msg
    assert "= {CPU 2.5}" in msg and "the cluster has: {CPU 2}" in msg  # asked, and what there is
    assert "--replicas 1" in msg and "--num-cpus" in msg  # what to change
    assert check_placement(_deployments(CPU_CONFIG, replicas=1), TWO_CORES) == []


def test_gpu_shares_pack_card_by_card():
    two_gpus = [{"CPU": 32.0, "GPU": 2.0}]
    assert check_placement(_deployments(GPU_CONFIG, replicas=4, gpus=0.5), two_gpus) == []
    with pytest.raises(PlacementError, match="GPU 0.6") as err:  # two 0.6 shares never share a card
        check_placement(_deployments(GPU_CONFIG, replicas=4, gpus=0.6), two_gpus)
    assert "--gpus-per-replica" in str(err.value) and "fits: 2 VessaAssistant" in str(err.value)
    # a share on each of two nodes' cards: whole replicas never span nodes
    with pytest.raises(PlacementError):
        check_placement(_deployments(GPU_CONFIG, replicas=1, gpus=2), [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}])


def test_autoscaling_bounds_min_must_fit_max_beyond_capacity_warns():
    gpu = _deployments(GPU_CONFIG)  # autoscaling 1 … 4, one GPU and 4 CPUs per replica
    assert replica_bounds(gpu["VessaAssistant"]) == (1, 4)
    (warning,) = check_placement(gpu, [{"CPU": 16.0, "GPU": 2.0}])
    assert "max_replicas 4" in warning and "only 2 fit" in warning and "not clamped" in warning
    assert check_placement(gpu, [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 4, "GPU": 1}]) == []
    gpu["VessaAssistant"]["autoscaling_config"]["min_replicas"] = 3
    with pytest.raises(PlacementError, match="3 VessaAssistant"):
        check_placement(gpu, [{"CPU": 16.0, "GPU": 2.0}])


def test_custom_resources_are_checked():
    opts = {
        "VessaAssistant": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0, "resources": {"assistant": 1}}},
        "VessaIngress": {"ray_actor_options": {"num_cpus": 0}},
    }
    assert check_placement(opts, [{"CPU": 1}, {"CPU": 1, "assistant": 1}, {"CPU": 1, "assistant": 1}]) == []
    with pytest.raises(PlacementError, match="assistant 1"):
        check_placement(opts, [{"CPU": 1}, {"CPU": 1, "assistant": 1}])


# ---------------------------------------------------------------------------------------------- vessa serve
def _serve(tiny_bank, tmp_path, *extra: str) -> tuple[subprocess.Popen, object]:
    # Output to a file, not a pipe: the local Ray's processes inherit it and may hold a pipe open after
    # `vessa serve` itself has exited. Its own session: a signal to the group reaches Ray's processes
    # too, as Ctrl-C in a terminal does.
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "serve", "--ckpt", "random", "--bank", str(tiny_bank),
         "--encoder", "tiny", "--device", "cpu", "--num-cpus", "2", "--port", str(free_port()), *extra],
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
def test_unplaceable_replica_count_fails_fast_with_the_reason(tiny_bank, tmp_path):
    t0 = time.monotonic()
    proc, log = _serve(tiny_bank, tmp_path, "--replicas", "2")
    rc = _finish(proc, 120)
    took = time.monotonic() - t0
    out = log.read_text()
    print(f"\nvessa serve --replicas 2 on 2 CPUs: exit {rc} after {took:.1f} s")
    assert rc == 2, out[-3000:]
    assert "cannot be placed" in out and "{CPU 2.5}" in out and "--replicas 1" in out, out[-3000:]
    assert "Traceback" not in out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_while_waiting_for_replicas_stops_cleanly(tiny_bank, tmp_path, sig):
    proc, log = _serve(tiny_bank, tmp_path, "--replicas", "1")
    deadline = time.monotonic() + 120
    while "waiting for the VESSA application to start" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _finish(proc, 1)
            pytest.fail(log.read_text()[-3000:])
        time.sleep(0.1)
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C does
    rc = _finish(proc, 60)
    took = time.monotonic() - t0
    out = log.read_text()
    print(f"\nvessa serve, {sig.name} while waiting for replicas: exit {rc} after {took:.1f} s")
    assert rc == 0, out[-3000:]
    assert "stopping before the application was ready" in out, out[-3000:]
    assert "Traceback" not in out and "Stack trace" not in out and "*** SIG" not in out, out[-3000:]


def test_the_packaged_default_serve_config_is_deploy_s():
    """`vessa serve` without --config reads the copy inside the package (an installed wheel has no
    deploy/); it must stay the file `serve run deploy/serve_cpu.yaml` uses."""
    from services.cli.serve import DEFAULT_SERVE_CONFIG, load_serve_config

    assert DEFAULT_SERVE_CONFIG.read_bytes() == CPU_CONFIG.read_bytes()
    assert load_serve_config(None) == load_serve_config(CPU_CONFIG)
