"""A Ray cluster of three nodes on this host, with the VESSA Serve app on it, driven by a test.

Run as `python -m tests.e2e.multinode CONFIG_JSON`: a head and two worker nodes from Ray's own multi-node
test harness (`ray.cluster_utils.Cluster`: separate raylets, each with its own object store and worker
processes), then JSON commands on stdin, one a line, each answered by one stdout line starting with
`@@ `. A separate process because the test process is already the driver of the session's one-node Ray
(tests/conftest.py) and a process can drive only one cluster.

Topology (custom resources decide what goes where):
- head:     resources {"head": 1}: the Serve controller and proxy, the VessaIngress replica, dispatcher "a"
- worker-1: {"assistant": 2, "worker-1": 1}      VessaAssistant replicas (num_cpus 0, {"assistant": 1})
- worker-2: {"assistant": 2, "worker-2": 1}      VessaAssistant replicas, dispatcher "b"
Every node has 1 CPU; nothing here asks for one, so the cluster fits 2 cores.

Commands: deploy {assistant: options} · dispatchers {names: {name: resources}, settings} · status ·
counters · stop_dispatchers · quit.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

from services.runtime.net import free_port

# Health checks between the GCS and raylets every 0.5 s, 3 misses: a SIGKILLed raylet's node is declared
# dead after about 2 s instead of Ray's default 30 s, so a node-loss test spends its time on recovery.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
WORKERS = ("worker-1", "worker-2")
INGRESS_OPTIONS = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.01}}}


def reply(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Host:
    def __init__(self, cfg: dict):
        import ray
        import ray._private.utils
        from ray.cluster_utils import Cluster

        # Cluster writes its address to /tmp/ray/ray_current_cluster, where every `ray.init()` without an
        # address on this machine (other test sessions, other users) would then find it: not on a shared host.
        ray._private.utils.write_ray_address = lambda *a, **k: None
        self.cfg = cfg
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "resources": {"head": 1},
                "gcs_server_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                "include_dashboard": False,
                "_system_config": SYSTEM_CONFIG,
            },
        )
        self.workers = {}
        for name in WORKERS:
            self.workers[name] = self.cluster.add_node(num_cpus=1, resources={"assistant": 2, name: 1})
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, include_dashboard=False)
        from ray import serve

        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port, "location": "HeadOnly"})
        self.dispatchers: dict = {}

    def nodes(self) -> dict:
        names = {self.cluster.head_node.node_id: "head"}
        names.update({n.node_id: name for name, n in self.workers.items()})
        return names

    def raylet_pids(self) -> dict:
        from ray._private import ray_constants

        return {
            name: n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
            for name, n in self.workers.items()
        }

    def deploy(self, assistant: dict, args: dict | None = None) -> dict:
        from ray import serve

        from services.ingress.app import build_app
        from tests.helpers import SERVE_TEST_ARGS

        app_args = {**SERVE_TEST_ARGS, "bank": self.cfg["bank"], "redis_url": self.cfg["redis_url"], **(args or {})}
        t0 = time.monotonic()
        serve.run(
            build_app(app_args, {"VessaAssistant": assistant, "VessaIngress": INGRESS_OPTIONS}),
            name="vessa",
            route_prefix="/",
        )
        return {"url": f"http://127.0.0.1:{self.port}", "deploy_s": time.monotonic() - t0, **self.status()}

    def status(self) -> dict:
        import ray
        from ray import serve

        st = serve.status().applications.get("vessa")
        replicas = {}
        if st is not None:
            dep = st.deployments.get("VessaAssistant")
            if dep is not None:
                replicas = {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}
        names = self.nodes()
        placement: dict = {}
        pids: dict = {}  # every live actor's worker process, per node (a node loss kills them all)
        for a in ray._private.state.actors().values():
            if a["State"] != "ALIVE":
                continue
            node = names.get(a["Address"]["NodeID"], a["Address"]["NodeID"])
            pids.setdefault(node, []).append(a["Pid"])
            if a["Name"].startswith("SERVE_REPLICA::vessa#VessaAssistant#"):
                placement[node] = placement.get(node, 0) + 1
        alive = sorted(names.get(n["NodeID"], n["NodeID"]) for n in ray.nodes() if n["Alive"])
        return {
            "t": time.time(),
            "app": str(st.status.value if st and hasattr(st.status, "value") else st.status if st else None),
            "replicas": replicas,
            "placement": placement,
            "alive_nodes": alive,
            "raylets": self.raylet_pids(),
            "actor_pids": pids,
        }

    def start_dispatchers(self, names: dict, settings: dict) -> dict:
        import ray

        from services.dispatch.launch import DispatcherActor

        actor_cls = ray.remote(DispatcherActor)
        out = {}
        for name, resources in names.items():
            actor = actor_cls.options(
                name=f"vessa-dispatcher-{name}", num_cpus=0, resources=resources, max_concurrency=64
            ).remote({**settings, "redis_url": self.cfg["redis_url"], "consumer": f"dispatcher-{name}"})
            ray.get(actor.start.remote(), timeout=120)
            self.dispatchers[name] = actor
            out[name] = self.nodes().get(ray.get(actor.node_id.remote()), "?")
        return {"placed": out}

    def counters(self) -> dict:
        import ray

        out = {}
        for name, actor in self.dispatchers.items():
            try:
                out[name] = ray.get(actor.counters.remote(), timeout=10)
            except Exception as exc:  # its node is gone
                out[name] = {"dead": type(exc).__name__}
        return {"counters": out}

    def stop_dispatchers(self) -> dict:
        import ray

        out = {}
        for name, actor in self.dispatchers.items():
            try:
                out[name] = ray.get(actor.stop.remote(), timeout=60)
            except Exception as exc:
                out[name] = {"dead": type(exc).__name__}
            ray.kill(actor)
        self.dispatchers = {}
        return {"counters": out}

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def main() -> None:
    host = Host(json.loads(sys.argv[1]))
    reply({"ready": True, "node_names": host.nodes(), **host.status()})
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        try:
            if cmd == "quit":
                break
            if cmd == "deploy":
                reply(host.deploy(msg["assistant"], msg.get("args")))
            elif cmd == "dispatchers":
                reply(host.start_dispatchers(msg["names"], msg.get("settings", {})))
            elif cmd == "status":
                reply(host.status())
            elif cmd == "counters":
                reply(host.counters())
            elif cmd == "stop_dispatchers":
                reply(host.stop_dispatchers())
            else:
                reply({"error": f"unknown command {cmd}"})
        except Exception as exc:
            reply({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
    host.shutdown()
    reply({"bye": True})


if __name__ == "__main__":
    main()
