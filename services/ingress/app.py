"""The Serve application: `VessaIngress` (FastAPI) → `VessaAssistant` replicas.

`serve run deploy/serve_cpu.yaml` imports `services.ingress.app:build_app`; `vessa serve` calls it too.
Application args (from the YAML's `args:` or `vessa serve` flags) configure both deployments; anything
not given comes from `VESSA_` environment variables (e.g. `VESSA_API_TOKEN`) or the defaults.
"""

from __future__ import annotations

import os

from ray.serve import Application

from assistant_server.deployment import AssistantSettings, VessaAssistant
from services.ingress.ingress import VessaIngress
from services.ingress.settings import ApiSettings


def all_cores_runtime_env() -> dict:
    """A Ray `runtime_env` that lets a CPU actor use every core of the machine. Ray starts an actor with
    `OMP_NUM_THREADS` = its `num_cpus` (1 when that is 0), which is right for a shared cluster; the demo
    and the benchmarks own the machine and compare against in-process calls that use every core."""
    return {"env_vars": {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}}


def build_app(args: dict | None = None, deployments: dict[str, dict] | None = None) -> Application:
    """args: application args (ApiSettings and AssistantSettings keys); deployments: per-deployment
    Serve options ({"VessaAssistant": {"num_replicas": 2, ...}}) as in a Serve config file."""
    args = dict(args or {})
    deployments = deployments or {}
    api_keys = set(ApiSettings.model_fields)
    assistant_keys = set(AssistantSettings.model_fields)
    unknown = set(args) - api_keys - assistant_keys
    if unknown:
        raise ValueError(
            f"unknown application args {sorted(unknown)}; known: {sorted(api_keys | assistant_keys)}"
        )
    api = ApiSettings(**{k: v for k, v in args.items() if k in api_keys})
    assistant_args = {k: v for k, v in args.items() if k in assistant_keys}
    # Validate here, in the process that builds the app, so a typo fails before any replica starts.
    AssistantSettings(**assistant_args)
    assistant = (
        VessaAssistant.options(**deployments.get("VessaAssistant", {}))
        if deployments.get("VessaAssistant")
        else VessaAssistant
    )
    ingress = (
        VessaIngress.options(**deployments.get("VessaIngress", {}))
        if deployments.get("VessaIngress")
        else VessaIngress
    )
    return ingress.bind(assistant.bind(assistant_args), api.model_dump(mode="json"))
