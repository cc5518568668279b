"""Can the Ray cluster place what the Serve config asks for? Checked before deploying.

A replica that no node can hold is never scheduled: Ray logs "taken more than 30s to be scheduled"
every 30 s and Serve waits forever. `check_placement` packs the replicas the application needs at
once (fixed `num_replicas`, or the autoscaling `min_replicas`/`initial_replicas`) onto the nodes'
total resources, first-fit, largest first, GPUs card by card (two 0.6 shares do not share a card) and
raises `PlacementError` with what was asked, what the cluster has and what to change. Autoscaling
`max_replicas` beyond what fits is only warned about: the bound stays, because nodes that join later
(`docker compose --profile workers`, KubeRay) are where those replicas go; until then Serve leaves them
pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EPS = 1e-9


class PlacementError(ValueError):
    pass


@dataclass
class Demand:
    """What one replica of a deployment asks for."""

    cpus: float = 1.0
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"CPU {self.cpus:g}"]
        if self.gpus:
            parts.append(f"GPU {self.gpus:g}")
        parts += [f"{k} {v:g}" for k, v in sorted(self.resources.items())]
        return "{" + ", ".join(parts) + "}"


@dataclass
class Node:
    cpus: float
    gpus: list[float]  # free share of each card
    resources: dict[str, float]

    @classmethod
    def from_ray(cls, resources: dict[str, float]) -> Node:
        custom = {
            k: float(v)
            for k, v in resources.items()
            if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
        }
        return cls(float(resources.get("CPU", 0)), [1.0] * int(resources.get("GPU", 0)), custom)

    def describe(self) -> str:
        parts = [f"CPU {self.cpus:g}"]
        if self.gpus:
            parts.append(f"GPU {len(self.gpus)}")
        parts += [f"{k} {v:g}" for k, v in sorted(self.resources.items())]
        return "{" + ", ".join(parts) + "}"

    def take(self, d: Demand) -> bool:
        """Reserve one replica's resources here if they fit."""
        if self.cpus + EPS < d.cpus or any(self.resources.get(k, 0) + EPS < v for k, v in d.resources.items()):
            return False
        cards: list[int] = []
        if d.gpus >= 1 - EPS:
            whole = [i for i, free in enumerate(self.gpus) if free >= 1 - EPS]
            if len(whole) + EPS < d.gpus:
                return False
            cards = whole[: int(round(d.gpus))]
            for i in cards:
                self.gpus[i] = 0.0
        elif d.gpus > 0:
            fitting = [i for i, free in enumerate(self.gpus) if free + EPS >= d.gpus]
            if not fitting:
                return False
            best = min(fitting, key=lambda i: self.gpus[i])  # best fit: keep whole cards whole
            self.gpus[best] -= d.gpus
        self.cpus -= d.cpus
        for k, v in d.resources.items():
            self.resources[k] -= v
        return True


def demand_of(options: dict) -> Demand:
    """A replica's demand from its Serve deployment options (Serve's default: 1 CPU)."""
    ray_opts = options.get("ray_actor_options") or {}
    cpus = ray_opts.get("num_cpus")
    return Demand(
        cpus=1.0 if cpus is None else float(cpus),
        gpus=float(ray_opts.get("num_gpus") or 0),
        resources={k: float(v) for k, v in (ray_opts.get("resources") or {}).items()},
    )


def replica_bounds(options: dict) -> tuple[int, int]:
    """(replicas needed to become ready, most replicas it may ask for)."""
    auto = options.get("autoscaling_config")
    if auto and options.get("num_replicas") in (None, "auto"):
        low = max(int(auto.get("min_replicas", 1)), int(auto.get("initial_replicas") or 0))
        return low, max(low, int(auto.get("max_replicas", 1)))
    n = options.get("num_replicas")
    n = 1 if n in (None, "auto") else int(n)
    return n, n


def _pack(nodes: list[Node], demands: list[Demand]) -> int:
    """Place demands in order (first fit); how many were placed before the first that did not fit."""
    for placed, d in enumerate(demands):
        if not any(n.take(d) for n in nodes):
            return placed
    return len(demands)


def _size(d: Demand) -> tuple:
    return (d.gpus, d.cpus, sum(d.resources.values()))


def check_placement(
    deployments: dict[str, dict],
    node_resources: list[dict[str, float]],
    config_name: str = "the Serve config",
    local: bool = False,
) -> list[str]:
    """Raise PlacementError when the replicas needed at start cannot all be placed; return warnings.

    deployments: {"VessaAssistant": options, "VessaIngress": options} as in the Serve config;
    node_resources: each alive node's total resources (`ray.nodes()[i]["Resources"]`)."""
    assistant = deployments.get("VessaAssistant") or {}
    ingress = deployments.get("VessaIngress") or {}
    a_demand, i_demand = demand_of(assistant), demand_of(ingress)
    a_need, a_most = replica_bounds(assistant)
    i_need, _ = replica_bounds(ingress)
    nodes = [Node.from_ray(r) for r in node_resources]
    have = ", ".join(n.describe() for n in nodes) or "no alive nodes"

    needed = sorted([i_demand] * i_need + [a_demand] * a_need, key=_size, reverse=True)
    if _pack([Node.from_ray(r) for r in node_resources], needed) < len(needed):
        fits = 0
        while fits < a_need:  # how many assistant replicas fit beside the ingress
            trial = [Node.from_ray(r) for r in node_resources]
            if _pack(trial, sorted([i_demand] * i_need + [a_demand] * (fits + 1), key=_size, reverse=True)) < i_need + fits + 1:
                break
            fits += 1
        total = Demand(
            a_demand.cpus * a_need + i_demand.cpus * i_need,
            a_demand.gpus * a_need + i_demand.gpus * i_need,
            {
                k: a_demand.resources.get(k, 0) * a_need + i_demand.resources.get(k, 0) * i_need
                for k in set(a_demand.resources) | set(i_demand.resources)
            },
        )
        changes = [f"--replicas {fits}" if fits else None]
        if a_demand.gpus:
            changes.append(
                "a smaller GPU share per replica (--gpus-per-replica; 0.5 packs two on a card) or more GPUs"
            )
        changes.append(f"a smaller ray_actor_options.num_cpus for VessaAssistant in {config_name}")
        changes.append("more CPUs (--num-cpus N for the local Ray)" if local else "more or larger Ray nodes")
        raise PlacementError(
            "the Serve application cannot be placed on this Ray cluster, so it would never become ready.\n"
            f"  asked for: {a_need} VessaAssistant replica(s) x {a_demand.describe()} and "
            f"{i_need} VessaIngress replica(s) x {i_demand.describe()} = {total.describe()}\n"
            f"  the cluster has: {have}\n"
            f"  fits: {fits} VessaAssistant replica(s) beside the ingress\n"
            "  change: " + "; or ".join(c for c in changes if c)
        )
    warnings = []
    if a_most > a_need:
        trial = [Node.from_ray(r) for r in node_resources]
        _pack(trial, needed)
        extra = _pack(trial, [a_demand] * (a_most - a_need))
        if extra < a_most - a_need:
            warnings.append(
                f"autoscaling max_replicas {a_most} for VessaAssistant: only {a_need + extra} fit on this "
                f"cluster now ({have}); Serve leaves the others pending until nodes with room for "
                f"{a_demand.describe()} join (the bound is kept, not clamped)"
            )
    return warnings
