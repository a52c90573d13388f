"""An emulated heterogeneous cluster on one machine: "nodes" that are network namespaces,
each with its own CPU budget (cgroup v1 `cpu.cfs_quota_us`) and one address, joined by a
full mesh of veth pairs whose every end is shaped by `tc tbf` to its link's rate.

Traffic from node i to node j always takes the direct veth (i, j) (a /32 route per peer),
so each pair of nodes has its own link, as the planner's model assumes. The caller's own
(root) namespace reaches every node over an unshaped management veth, the way a client and
the operator reach a real cluster. Needs root, `ip`, `tc` and the cgroup v1 cpu controller
(`available()` says why not); `Cluster.stop()` removes everything it made.

The description is a mapping (a YAML file in bench/clusters):

    nodes: [{name: a, cpus: 0.8, memory: 2Gi, tier: edge}, ...]
    links: [{a: a, b: b, mbps: 50}, ...]     # pairs not listed get defaultMbps
    defaultMbps: 200
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000
"""The CFS period of a node's quota: 10 ms (the kernel's default is 100 ms). A quota lets a
node run at a whole core's speed until its share of the period is spent, then pauses it;
with 100 ms periods a stage that works 20 ms and waits 80 (any stage but the bottleneck)
ran at the whole core's speed, not at its share, so a node was a fast CPU paused now and
then rather than the slower CPU it stands for. A 10 ms period (1 ms of CPU at 0.1 core,
the kernel's least quota) slices the work finely enough that a step of a few
milliseconds or more runs at the node's share, busy or not."""
SHARES = 262_144
"""The largest cpu.shares: on a busy machine a node still gets its whole budget (the quota
caps it), so a node's CPU is what the cluster file says, not what the neighbours leave."""


def available() -> str | None:
    """None when this machine can emulate a cluster, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, cgroups)"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return "needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu"
    return None


PROBE_PORT, LINK_PORT = 8090, 8091
"""The probe's ports inside a node: each node has its own namespace, so fixed ports do not
collide (the root namespace never listens on them)."""


def probe_command(
    prefix: list[str],
    *,
    host: str | None = None,
    seconds: float,
    threads: int = 1,
    layer_shape: str | None = None,
) -> list[str]:
    """`python -m llmpipe_stage.probe` run by `prefix` (a node's, or the reference cgroup's):
    serving on the node's address when `host` is given, else `--once` (print and exit);
    `layer_shape` (`H,I,HEADS,KV`): the served model's, for the product curve."""
    command = [*prefix, sys.executable, "-m", "llmpipe_stage.probe"]
    if host is None:
        command.append("--once")
    else:
        command += ["--host", host, "--port", str(PROBE_PORT), "--link-port", str(LINK_PORT)]
    if layer_shape:
        command += ["--layer-shape", layer_shape]
    return [*command, "--threads", str(threads), "--seconds", str(seconds)]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` so far, all its threads, ended ones too
    (`/proc/PID/stat`, in clock ticks: 10 ms here): what a node's quota limits."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def steal_seconds() -> float:
    """CPU time the hypervisor took from this machine's CPUs so far (`/proc/stat` steal,
    all CPUs): on a virtual machine the host's other work shows here, not in any process."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / CLOCK_TICKS


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


@dataclasses.dataclass
class Node:
    name: str
    index: int
    cpus: float
    address: str
    namespace: str
    cgroup: Path
    facts: Mapping[str, Any]
    """The node's entry of the description (memory, tier, ...)."""

    def prefix(self) -> list[str]:
        """Run a command as a process of this node: in its cgroup, in its namespace."""
        tasks = self.cgroup / "tasks"
        return ["sh", "-c", f'echo $$ > {tasks} && exec "$@"', "node", *self.netns()]

    def netns(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]

    def cpu_stat(self) -> dict[str, int]:
        """The node cgroup's `cpu.stat`: `nr_periods`, `nr_throttled` (periods in which the
        quota ran out), `throttled_time` (ns), ..."""
        text = (self.cgroup / "cpu.stat").read_text()
        return {key: int(value) for key, value in (line.split() for line in text.splitlines())}

    def set_cpus(self, cpus: float) -> None:
        """Change the node's CPU budget (cores) while its processes run."""
        (self.cgroup / "cpu.cfs_quota_us").write_text(str(int(cpus * PERIOD_US)))
        self.cpus = cpus


@dataclasses.dataclass
class Cluster:
    tag: str
    nodes: list[Node]
    link_mbps: dict[frozenset[str], float]
    root_address: str
    _made: list[tuple[str, ...]] = dataclasses.field(default_factory=list)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def mbps(self, a: str, b: str) -> float:
        return self.link_mbps[frozenset((a, b))]

    @classmethod
    def start(cls, description: Mapping[str, Any]) -> Cluster:
        reason = available()
        if reason:
            raise RuntimeError(f"cannot emulate a cluster here: {reason}")
        tag = f"{os.getpid() % 1000:03d}{random.randint(0, 9)}"
        subnet = random.randint(1, 250)
        default = float(description.get("defaultMbps", 1000))
        entries = list(description["nodes"])
        nodes = [
            Node(
                name=str(entry["name"]),
                index=i,
                cpus=float(entry["cpus"]),
                address=f"10.241.{subnet}.{i + 1}",
                namespace=f"llmpipe-emu-{tag}-{i}",
                cgroup=CGROUP_CPU / f"llmpipe-emu-{tag}-{i}",
                facts=dict(entry),
            )
            for i, entry in enumerate(entries)
        ]
        links = {frozenset((a.name, b.name)): default for a in nodes for b in nodes if a != b}
        for link in description.get("links") or []:
            links[frozenset((str(link["a"]), str(link["b"])))] = float(link["mbps"])
        cluster = cls(tag, nodes, links, root_address=f"10.241.{subnet}.254")
        try:
            cluster._build()
        except Exception:
            cluster.stop()
            raise
        return cluster

    def _build(self) -> None:
        tag = self.tag
        self._cgroup(self.reference_cgroup, cpus=1.0)
        self._cgroup(self.network_cgroup, cpus=None)
        for node in self.nodes:
            self._cgroup(node.cgroup, cpus=node.cpus)
            _run("ip", "netns", "add", node.namespace)
            self._made.append(("netns", node.namespace))
            ns = node.netns()
            _run(*ns, "ip", "link", "set", "lo", "up")
            _run(*ns, "ip", "addr", "add", f"{node.address}/32", "dev", "lo")
            outside, inside = f"lpm{tag}{node.index}", f"lpn{tag}{node.index}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self._made.append(("link", outside))
            _run("ip", "link", "set", inside, "netns", node.namespace)
            # the root side's address sits on every management veth (gone with the veth)
            _run("ip", "addr", "add", f"{self.root_address}/32", "dev", outside)
            _run("ip", "link", "set", outside, "up")
            _run(*ns, "ip", "link", "set", inside, "up")
            _run(
                "ip", "route", "add", f"{node.address}/32", "dev", outside, "src", self.root_address
            )
            _run(
                *ns,
                "ip",
                "route",
                "add",
                f"{self.root_address}/32",
                "dev",
                inside,
                "src",
                node.address,
            )
        for a in self.nodes:
            for b in self.nodes:
                if a.index < b.index:
                    self._link(a, b, self.mbps(a.name, b.name))

    @property
    def reference_cgroup(self) -> Path:
        return CGROUP_CPU / f"llmpipe-emu-{self.tag}-reference"

    def reference_prefix(self) -> list[str]:
        """Run a command with one whole core (same shares as the nodes), in this namespace:
        the figure a node's `cpus` is a share of."""
        tasks = self.reference_cgroup / "tasks"
        return ["sh", "-c", f'echo $$ > {tasks} && exec "$@"', "reference"]

    @property
    def network_cgroup(self) -> Path:
        return CGROUP_CPU / f"llmpipe-emu-{self.tag}-network"

    def network_prefix(self, node: Node) -> list[str]:
        """Run a command in `node`'s namespace but outside its CPU budget, in a cgroup of
        the nodes' shares and no quota: a process that stands for the network (the
        delaying relay, tests/support/relay.py), whose work a real link does not take
        from the node's CPU and which the busy nodes must not starve."""
        tasks = self.network_cgroup / "tasks"
        return ["sh", "-c", f'echo $$ > {tasks} && exec "$@"', "network", *node.netns()]

    def _cgroup(self, path: Path, *, cpus: float | None) -> None:
        """A cgroup of the nodes' shares with `cpus` cores' quota (None: no quota)."""
        path.mkdir()
        self._made.append(("cgroup", str(path)))
        (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (path / "cpu.shares").write_text(str(SHARES))
        quota = -1 if cpus is None else int(cpus * PERIOD_US)
        (path / "cpu.cfs_quota_us").write_text(str(quota))

    def _link(self, a: Node, b: Node, mbps: float) -> None:
        end_a, end_b = f"lpl{self.tag}{a.index}{b.index}a", f"lpl{self.tag}{a.index}{b.index}b"
        _run("ip", "link", "add", end_a, "type", "veth", "peer", "name", end_b)
        self._made.append(("link", end_a))
        for node, end, peer in ((a, end_a, b), (b, end_b, a)):
            ns = node.netns()
            _run("ip", "link", "set", end, "netns", node.namespace)
            _run(*ns, "ip", "link", "set", end, "up")
            _run(*ns, "ip", "route", "add", f"{peer.address}/32", "dev", end, "src", node.address)
            # A small bucket (16 kB) so a short transfer cannot ride a burst above the rate.
            _run(*ns, "tc", "qdisc", "add", "dev", end, "root", "tbf", "rate", f"{mbps}mbit",
                 "burst", "16kb", "latency", "200ms")  # fmt: skip

    def stop(self) -> None:
        """Remove namespaces, links and cgroups (processes in them must have ended)."""
        for kind, name in reversed(self._made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            elif kind == "link":
                subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
            elif kind == "cgroup":
                with contextlib.suppress(OSError):  # a process still in it: left for its end
                    Path(name).rmdir()
        self._made.clear()
