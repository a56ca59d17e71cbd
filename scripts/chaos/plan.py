"""What one chaos cycle does, drawn from a seeded random generator.

Called by the driver (``scripts/chaos.py``) once per cycle, before anything runs: the
whole cycle (config, ranks/nodes, kill target and moment, scratch loss) follows from
``(seed, cycle)``, so ``--seed S --first-cycle C --cycles 1`` replays cycle ``C``.
"""
import random
from dataclasses import asdict, dataclass, field

# name: (mode, nodes (list or range), ranks per node, sections, persistent, launcher)
CONFIGS = {
    "sync_persistent": dict(mode="sync", nodes=(2, 2), per_node=1, persistent=True),
    "async_persistent": dict(mode="async", nodes=(1, 1), per_node=2, persistent=True),
    "sync_partner": dict(mode="sync", nodes=(4, 4), per_node=1, sections={"partner": {"enabled": "true"}}),
    "async_partner": dict(mode="async", nodes=(4, 4), per_node=1, launcher="veloc-run",
                          sections={"partner": {"enabled": "true"}}),
    "xor": dict(mode="sync", nodes=(4, 4), per_node=1,
                sections={"erasure": {"enabled": "true", "scheme": "xor", "group_size": "4"}}),
    "rs": dict(mode="sync", nodes=(4, 6), per_node=1,
               sections={"erasure": {"enabled": "true", "scheme": "rs", "parity": "2"}}),
    "scratch_only": dict(mode="sync", nodes=(2, 2), per_node=1),
}

POINT_TARGETS = {
    "local_write": lambda c: True,
    "manifest_commit": lambda c: True,
    "checksum": lambda c: True,
    "partner_transfer": lambda c: "partner" in c.get("sections", {}),
    "erasure_encode": lambda c: "erasure" in c.get("sections", {}),
    "flush": lambda c: c.get("persistent", False),
    "versioning": lambda c: True,
}
TARGETS = ("rank", "job", "backend", "backend_flush", "point", "fill_disk")
# how often each target is drawn among those a config allows: named points are split
# over up to 7 points, so they get the largest share
TARGET_WEIGHTS = {"rank": 2, "job": 2, "backend": 2, "backend_flush": 2, "point": 5, "fill_disk": 1}
LOSSES = ("none", "node", "all")
COMMON_POINTS = ("local_write", "manifest_commit", "checksum", "versioning")


@dataclass
class Cycle:
    """Everything one cycle does; JSON-able (``asdict``) for the report."""
    index: int
    seed: int
    config: str
    mode: str
    nodes: list
    per_node: int
    scratch_versions: int
    max_versions: int
    iterations: int
    every: int
    wait_every: int
    target: str                  # one of TARGETS
    point: str = None            # named point (target point / backend_flush)
    nth: int = 1
    where: str = None            # node id (or rank) the point is armed on
    kill_after: int = 0          # random-time targets: versions journaled before the kill
    kill_delay: float = 0.0      # ... plus this many seconds
    victim: int = 0              # rank (target rank) / node index (backend, fill_disk)
    loss: str = "none"           # scratch lost after the kill: none, node, all
    lost_node: str = None
    sections: dict = field(default_factory=dict)
    persistent: bool = False
    launcher: str = "mpiexec"

    @property
    def nranks(self):
        return len(self.nodes) * self.per_node

    def fault_env(self):
        """``VELOC_FAULT`` value for the first run, or ``None``."""
        if self.point is None:
            return None
        return f"{self.point}:{self.nth}" + (f":{self.where}" if self.where else "")

    def describe(self):
        what = self.target if self.point is None else f"{self.target}@{self.point}:{self.nth}:{self.where}"
        return (f"cycle {self.index} {self.config} nodes={len(self.nodes)}x{self.per_node} "
                f"sv={self.scratch_versions} mv={self.max_versions} every={self.every} {what} "
                f"loss={self.loss}{':' + self.lost_node if self.lost_node else ''}")

    def to_json(self):
        return asdict(self)


def targets_for(spec):
    """Kill targets that make sense for a config."""
    out = ["rank", "job", "point"]
    if spec["mode"] == "async":
        out.append("backend")
        if spec.get("persistent"):
            out.append("backend_flush")
    else:
        out.append("fill_disk")
    return out


def plan_cycle(seed, index, configs=None, targets=None):
    """Draw cycle ``index`` of campaign ``seed`` among ``configs`` x ``targets``."""
    rng = random.Random(f"chaos-{seed}-{index}")
    names = list(configs or CONFIGS)
    name = rng.choice(names)
    spec = CONFIGS[name]
    allowed = [t for t in targets_for(spec) if targets is None or t in targets]
    if not allowed:
        allowed = [t for t in targets_for(spec) if t in ("rank", "job")] or ["rank"]
    lo, hi = spec["nodes"]
    count = rng.randint(lo, hi)
    prefix = "vnode" if spec.get("launcher") == "veloc-run" else "n"
    nodes = [f"{prefix}{i}" for i in range(count)]
    sections = {k: dict(v) for k, v in spec.get("sections", {}).items()}
    if name == "rs":
        sections["erasure"]["group_size"] = str(count)
    cycle = Cycle(index=index, seed=seed, config=name, mode=spec["mode"], nodes=nodes,
                  per_node=spec["per_node"], scratch_versions=rng.randint(1, 2),
                  max_versions=rng.randint(1, 3), iterations=rng.randint(4, 7),
                  every=rng.choice((1, 1, 2)), wait_every=rng.choice((1, 2)),
                  target=rng.choices(allowed, [TARGET_WEIGHTS[t] for t in allowed])[0], sections=sections,
                  persistent=spec.get("persistent", False), launcher=spec.get("launcher", "mpiexec"))
    checkpoints = cycle.iterations // cycle.every
    if cycle.target == "point":
        points = [p for p, ok in POINT_TARGETS.items() if ok(spec)]
        # the points of the config's own levels (partner, erasure, flush) twice as often
        cycle.point = rng.choices(points, [1 if p in COMMON_POINTS else 2 for p in points])[0]
        # engine points pass once per local rank per version in the one engine process of
        # a node; client points once per version in each rank process
        per_version = cycle.per_node if cycle.point in ("checksum", "flush", "versioning") else 1
        cycle.nth = rng.randint(1, max(1, checkpoints * per_version))
        cycle.where = rng.choice(nodes)
    elif cycle.target == "backend_flush":
        cycle.point = "flush"
        cycle.nth = rng.randint(1, max(1, checkpoints * cycle.per_node))
        cycle.where = rng.choice(nodes)
    else:
        cycle.kill_after = rng.randint(0, max(0, checkpoints - 1))
        cycle.kill_delay = round(rng.uniform(0.0, 0.25), 3)
        cycle.victim = rng.randrange(cycle.nranks if cycle.target == "rank" else len(nodes))
    cycle.loss = rng.choice(("none", "none", "node", "node", "all"))
    if cycle.loss == "node":
        cycle.lost_node = rng.choice(nodes)
    return cycle


def config_text(cycle, scratch, persistent):
    """The INI file of a cycle's job."""
    lines = [f"scratch = {scratch}/{{node}}", f"mode = {cycle.mode}",
             f"scratch_versions = {cycle.scratch_versions}"]
    if cycle.persistent:
        lines += [f"persistent = {persistent}", "persistent_interval = 0",
                  f"max_versions = {cycle.max_versions}"]
    for section, keys in cycle.sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def must_survive(cycle):
    """Whether versions reported done must survive this cycle's scratch loss."""
    if cycle.loss == "none":
        return True
    if cycle.persistent:
        return True
    if cycle.loss == "all":
        return False
    return bool(cycle.sections)      # partner or erasure covers one lost node
