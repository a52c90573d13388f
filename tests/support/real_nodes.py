"""Real nodes for the `nodes` test tier: kubelets that run the rendered pods for real.

`RealCluster.start(workdir)` starts, on this machine:

- a control plane (tests/support/control_plane.py) whose API server listens on
  API_ADDRESS, a non-loopback address added to `lo`, so pods reach it through the
  `kubernetes` Service (an operator pod needs that);
- one kube-proxy (iptables mode) for the host network namespace that every node here
  shares: it programs the ClusterIPs once for all of them;
- a cluster DNS stand-in (tests/support/cluster_dns.py) on DNS_ADDRESS;
- per node: its own containerd (root, state, socket, CNI config), a CNI bridge with the
  node's own /24 of POD_NETWORK, the images of scripts/build-images imported, and a
  kubelet (built by `scripts/build-k8s-tools --node`) with its own root dir, ports and a
  node IP of its own on `lo` (the kubelet refuses a loopback node IP, and `kubectl logs`
  needs a node address);
- and one kwok node beside them, as in the cluster tier.

The node settings that this machine needs (hybrid cgroup v1, no systemd) are in
`kubelet_config` and `containerd_config`, each with the reason. `stop()` deletes the pods
of the real nodes through the API (so the kubelets stop them and CNI tears their networks
down), stops the kubelets, kills whatever task is left, stops containerd, kube-proxy
(`--cleanup` removes its iptables rules), the DNS and the control plane, and removes the
bridges and addresses it added. Only one such cluster runs on a machine at a time (a lock).
Needs root.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from lightkube.resources.core_v1 import Node, Pod

from tests.support import cluster_dns, nodes, wait
from tests.support import control_plane as cp

REPO = Path(__file__).resolve().parents[2]
API_ADDRESS = "10.251.0.100"
DNS_ADDRESS = "10.251.0.53"
POD_NETWORK = "10.245.0.0/16"
CNI_BIN = Path("/usr/lib/cni")
"""Debian's containernetworking-plugins."""
LOCK = Path("/run/llmpipe-real-nodes.lock")
HOST_COMMANDS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip")
NODE_BINARIES = ("kubelet", "kube-proxy")
SYSCTLS = {
    # Pods of different nodes talk through the host's routing table.
    "net/ipv4/ip_forward": "1",
    # Pod -> Service -> pod on the same bridge needs the bridge's traffic to pass iptables
    # (kube-proxy's DNAT is undone by conntrack on the way back).
    "net/bridge/bridge-nf-call-iptables": "1",
}


class RealNodesError(RuntimeError):
    """A real node could not be started; the message names the component and its log."""


# ---------------------------------------------------------------------------- prerequisites


def _built(script: str, env_var: str, *args: str) -> Path:
    configured = os.environ.get(env_var)
    if configured:
        return Path(configured)
    done = subprocess.run(
        [str(REPO / "scripts" / script), *args, "--dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise cp.MissingBinaries(
            f"not built: run `scripts/{script} {' '.join(args)}`".rstrip()
            + f" ({done.stderr.strip()})"
        )
    return Path(done.stdout.strip())


def find_node_bin_dir() -> Path:
    """$LLMPIPE_K8S_NODE_BIN, else the cached `scripts/build-k8s-tools --node` (never builds)."""
    bin_dir = _built("build-k8s-tools", "LLMPIPE_K8S_NODE_BIN", "--node")
    missing = [b for b in NODE_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise cp.MissingBinaries(f"{bin_dir} lacks {', '.join(missing)}")
    return bin_dir


def find_images_dir() -> Path:
    """$LLMPIPE_IMAGES, else the cached `scripts/build-images` (never builds)."""
    images = _built("build-images", "LLMPIPE_IMAGES")
    for name in ("images.env", "manifests.json"):
        if not (images / name).exists():
            raise cp.MissingBinaries(f"{images} holds no {name}: run scripts/build-images")
    return images


def image_names(images: Path) -> dict[str, str]:
    """{"OPERATOR_IMAGE": ..., "STAGE_IMAGE": ..., "PAUSE_IMAGE": ...} of a build."""
    pairs = (line.split("=", 1) for line in (images / "images.env").read_text().splitlines())
    return {key: value for key, value in pairs}


def missing_prerequisites() -> list[str]:
    """What this machine lacks for real nodes (empty when it has everything)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (containerd, kubelet and the CNI bridge need it)")
    missing += [c for c in HOST_COMMANDS if shutil.which(c) is None]
    if not (CNI_BIN / "bridge").exists():
        missing.append(f"{CNI_BIN}/bridge (Debian: containernetworking-plugins)")
    return missing


# ---------------------------------------------------------------------------- host network


def _run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class HostNetwork:
    """The host-wide settings: sysctls (restored on undo) and addresses on `lo`."""

    addresses: list[str]
    _saved: dict[str, str] = field(default_factory=dict)
    _added: list[str] = field(default_factory=list)
    _lock: TextIO | None = None

    def apply(self) -> None:
        lock = LOCK.open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            lock.close()
            raise RealNodesError(f"another test session runs real nodes here ({LOCK})") from error
        self._lock = lock
        for key, value in SYSCTLS.items():
            path = Path("/proc/sys") / key
            self._saved[key] = path.read_text().strip()
            path.write_text(value)
        present = _run("ip", "-o", "-4", "addr", "show", "dev", "lo").stdout
        for address in self.addresses:
            if f" {address}/" not in present:
                _run("ip", "addr", "add", f"{address}/32", "dev", "lo")
                self._added.append(address)

    def undo(self) -> None:
        for address in self._added:
            _run("ip", "addr", "del", f"{address}/32", "dev", "lo", check=False)
        self._added.clear()
        for key, value in self._saved.items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / key).write_text(value)
        self._saved.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


# ---------------------------------------------------------------------------- image store


BOLT_FILES = (
    "io.containerd.metadata.v1.bolt/meta.db",
    "io.containerd.snapshotter.v1.overlayfs/metadata.db",
)
"""containerd's databases: copied for real into each node, where everything else is linked."""


HOLD = "localhost/llmpipe-import-hold"
"""Names that keep a store's images (and so their snapshots) while a new build imports."""


def _store_images(ctr: tuple[str, ...]) -> dict[str, list[str]]:
    """{image ref: its layer digests} of the images in a containerd store (each imported
    and unpacked, so each of these layers has its snapshot)."""
    found: dict[str, list[str]] = {}
    for line in _run(*ctr, "images", "ls").stdout.splitlines()[1:]:
        if not line.strip():
            continue
        ref, _, digest = line.split()[:3]
        body = json.loads(_run(*ctr, "content", "get", digest).stdout)
        found[ref] = [layer["digest"] for layer in body.get("layers", [])]
    return found


def _storage_layers(storage: Path) -> dict[str, str]:
    """{uncompressed digest: layer id} of the layers in buildah's overlay storage that can be
    reassembled (c/storage keeps, per layer, a tar-split record beside its diff directory)."""
    found: dict[str, str] = {}
    for listing in ("layers.json", "volatile-layers.json"):
        path = storage / "overlay-layers" / listing
        if not path.exists():
            continue
        for layer in json.loads(path.read_text()):
            split = storage / "overlay-layers" / f"{layer['id']}.tar-split.gz"
            if layer.get("diff-digest") and split.exists():
                found.setdefault(layer["diff-digest"], layer["id"])
    return found


def _layer_chunks(storage: Path, layer_id: str) -> Iterator[bytes]:
    """The layer's tar stream byte for byte as it was committed: the tar-split record holds
    the headers and padding, the diff directory the files' contents (what `buildah push`
    does before compressing; containerd checks the digest of what it receives)."""
    import base64
    import gzip

    diff = storage / "overlay" / layer_id / "diff"
    with gzip.open(storage / "overlay-layers" / f"{layer_id}.tar-split.gz") as split:
        for line in split:
            entry = json.loads(line)
            if entry["type"] == 2:  # a segment: tar headers, padding
                yield base64.b64decode(entry.get("payload") or "")
            elif entry["type"] == 1 and entry.get("size"):  # a file's contents
                name = entry.get("name")
                if name is None:
                    name = base64.b64decode(entry["name_raw"]).decode("utf-8", "surrogateescape")
                left = int(entry["size"])
                with (diff / name).open("rb") as source:
                    while left:
                        chunk = source.read(min(left, 1 << 20))
                        if not chunk:
                            raise RealNodesError(
                                f"layer {layer_id}: {name} is shorter than recorded"
                            )
                        left -= len(chunk)
                        yield chunk


def _write_member(sink: Any, name: str, size: int, chunks: Iterable[bytes]) -> None:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    sink.write(info.tobuf(tarfile.GNU_FORMAT))  # GNU: sizes past 8 GiB
    written = 0
    for chunk in chunks:
        sink.write(chunk)
        written += len(chunk)
    if written != size:
        raise RealNodesError(f"{name}: {written} bytes, recorded {size}")
    sink.write(b"\0" * (-size % 512))


def _write_oci_archive(sink: Any, images: Path, record: dict[str, Any], skip: set[str]) -> None:
    """An OCI archive of a build's images for `ctr images import`, made on the fly: the
    manifests and configs from scripts/build-images' record, each layer not in `skip`
    reassembled from buildah's storage. Layers in `skip` are unpacked in the store already:
    containerd's unpack finds their snapshots and never reads them. The index names each
    image in full (io.containerd.image.name), so ctr imports it under that name."""
    storage = Path(record["storage"])
    by_digest = _storage_layers(storage)
    manifests = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image["manifest"],
            "size": image["manifest_size"],
            "annotations": {"io.containerd.image.name": ref},
        }
        for ref, image in record["images"].items()
    ]
    index = json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()
    layout = b'{"imageLayoutVersion": "1.0.0"}'
    _write_member(sink, "oci-layout", len(layout), [layout])
    _write_member(sink, "index.json", len(index), [index])
    sent: set[str] = set()
    for image in record["images"].values():
        for digest in (image["manifest"], image["config"]):
            if digest in sent:
                continue
            data = (images / "blobs" / digest.split(":", 1)[1]).read_bytes()
            _write_member(sink, f"blobs/sha256/{digest.split(':', 1)[1]}", len(data), [data])
            sent.add(digest)
        for layer in image["layers"]:
            digest = layer["digest"]
            if digest in sent or digest in skip:
                continue
            if digest not in by_digest:
                raise RealNodesError(
                    f"layer {digest} is no longer in buildah's storage ({storage}): "
                    "run scripts/build-images again"
                )
            name = f"blobs/sha256/{digest.split(':', 1)[1]}"
            _write_member(sink, name, int(layer["size"]), _layer_chunks(storage, by_digest[digest]))
            sent.add(digest)
    sink.write(b"\0" * 1024)


def seeded_root(images: Path, *, progress: Any = print) -> Path:
    """A containerd root with the images of `images` imported (scripts/build-images' OCI
    layout), kept as ${LLMPIPE_CACHE}/node-images/store/root and updated in place when a
    build changes: only the layers the store lacks are imported (after a source change, the
    small layer installing llmpipe; the dependency layers' snapshots stay), the images of
    older builds are removed and containerd's garbage collection frees their snapshots.

    Importing the stage image (several GB) into each node's containerd took minutes and
    twice the disk; instead each node's root is a hard-linked copy of this one
    (`link_root`): the content blobs and unpacked layers are read-only, and the only files
    containerd writes in place, its two bolt databases, are copied. Layer blobs are dropped
    once unpacked (containers run from the snapshots).
    """
    cache = (
        Path(os.environ.get("LLMPIPE_CACHE", Path.home() / ".cache" / "llmpipe")) / "node-images"
    )
    store = cache / "store"
    record = store / "imported.json"
    built: dict[str, Any] = json.loads((images / "manifests.json").read_text())
    wanted: dict[str, dict[str, Any]] = built["images"]
    if record.exists() and json.loads(record.read_text()) == wanted:
        return store / "root"
    if cache.exists():  # the per-build seeds of an older version of this code
        for old in cache.iterdir():
            if old.name != store.name:
                shutil.rmtree(old, ignore_errors=True)
    record.unlink(missing_ok=True)
    work = store / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "config.toml"
    sock = work / "c.sock"
    config.write_text(
        f'version = 2\nroot = "{store / "root"}"\nstate = "{work / "state"}"\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{work / "opt"}"\n'
    )
    daemon = cp._spawn(
        "containerd-seed", ["containerd", "--config", str(config)], work, tie_to_parent=True
    )
    daemon.binary = shutil.which("containerd") or daemon.binary
    began = time.monotonic()
    ctr = ("ctr", "--address", str(sock), "-n", "k8s.io")
    discarded: list[str] = []
    try:
        _wait_for(
            "the seeding containerd",
            lambda: _run(*ctr, "version", check=False).returncode == 0,
            daemon,
            60,
        )
        present = _store_images(ctr)
        have = {layer for layers in present.values() for layer in layers}
        sizes = {la["digest"]: int(la["size"]) for i in wanted.values() for la in i["layers"]}
        needed = set(sizes) - have
        size = sum(sizes[d] for d in needed)
        progress(
            f"real nodes: importing {len(wanted)} images into the node image store: "
            f"{len(needed)} new layers, {size / 1e6:.0f} MB ({len(set(sizes) & have)} reused)"
        )
        # Hold the images already here under names of their own while importing: the import
        # moves the refs to the new manifests before it unpacks them, and a garbage
        # collection in between would free the very snapshots the new images reuse.
        for n, ref in enumerate(present):
            _run(*ctr, "images", "tag", "--force", ref, f"{HOLD}:{n}")
        for skip in (have, set()):  # all blobs if a skipped layer's snapshot is gone
            importer = subprocess.Popen(
                [*ctr, "images", "import", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert importer.stdin is not None
            try:
                _write_oci_archive(importer.stdin, images, built, skip)
            except BrokenPipeError:
                pass
            finally:
                importer.stdin.close()
            output = importer.stdout.read().decode() if importer.stdout else ""
            if importer.wait(timeout=1800) == 0:
                break
            if not skip:
                raise RealNodesError(f"ctr images import failed:\n{output}")
            progress(
                f"real nodes: import without the known layers failed, retrying whole: {output}"
            )
        # The holds and older builds' images go; a synchronous removal runs the garbage
        # collection that frees their snapshots (a stopped containerd never collects).
        for ref in _store_images(ctr):
            if ref not in wanted:
                _run(*ctr, "images", "rm", "--sync", ref)
        # Once unpacked, the layer blobs are dead weight (gigabytes): containers run from
        # the snapshots (as with containerd's CRI option discard_unpacked_layers).
        for image in wanted.values():
            for layer in image["layers"]:
                done = _run(*ctr, "content", "rm", layer["digest"], check=False)
                if done.returncode == 0:
                    discarded.append(layer["digest"].split(":", 1)[1])
    finally:
        cp._stop([daemon])
    # `content rm` forgets a blob at once; its file goes only at containerd's next garbage
    # collection, which a stopped containerd never runs.
    blobs = store / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256"
    for digest in discarded:
        (blobs / digest).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    record.write_text(json.dumps(wanted))
    progress(f"real nodes: node image store updated in {time.monotonic() - began:.0f}s")
    return store / "root"


def link_root(seed: Path, root: Path) -> None:
    """A node's containerd root: `cp -al` of the seed, with real copies of the databases
    (a plain copy if the two lie on different filesystems)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    linked = _run("cp", "-al", str(seed), str(root), check=False)
    if linked.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        _run("cp", "-a", str(seed), str(root), timeout=1800)
        return
    for name in BOLT_FILES:
        target = root / name
        if target.exists():
            target.unlink()
            shutil.copy2(seed / name, target)


# ---------------------------------------------------------------------------- one node


def _wait_for(what: str, check: Any, component: cp.Component, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not component.alive():
            raise RealNodesError(
                f"{what}: {component.name} exited; {component.log}:\n{component.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RealNodesError(
                f"{what}: not after {timeout:.0f}s; {component.log}:\n{component.log_tail()}"
            )
        time.sleep(0.2)


@dataclass
class RealNode:
    """One kubelet + containerd + CNI bridge, registered as Node `name`."""

    name: str
    index: int
    workdir: Path
    node_ip: str
    pod_subnet: str
    bridge: str
    components: list[cp.Component] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def plan(cls, name: str, index: int, workdir: Path) -> RealNode:
        """Node `index` (1, 2, ...): 10.251.0.<index> and 10.245.<index>.0/24."""
        return cls(
            name=name,
            index=index,
            workdir=workdir / name,
            node_ip=f"10.251.0.{index}",
            pod_subnet=f"10.245.{index}.0/24",
            bridge=f"llmpipe{index}",
        )

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    # -- configuration ---------------------------------------------------------------------

    def containerd_config(self, pause_image: str) -> str:
        base = self.workdir / "containerd"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"
[{cri}]
  # Built here (scripts/build-images): no registry serves registry.k8s.io/pause.
  sandbox_image = "{pause_image}"
  # This machine's hybrid cgroup v1 without systemd: with cgroups, apparmor or an OOM score
  # below the runtime's own, runc fails the sandbox ("can't get final child's PID from
  # pipe: EOF"). So memory limits are not enforced on these nodes.
  disable_cgroup = true
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  Root = "{base / "runc"}"
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.workdir / "cni"}"
  max_conf_num = 1
"""

    def cni_conflist(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": f"llmpipe-{self.name}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.pod_subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def kubelet_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["kubelet-healthz"],
            # The API server reaches the kubelet (logs, exec) with no client certificate.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # Hybrid cgroup v1 without systemd: 1.35 refuses cgroup v1 unless told, and
            # the QoS hierarchy and node-allocatable enforcement need cgroups we lack
            # (containerd runs the containers without cgroups, above).
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "clusterDomain": cluster_dns.CLUSTER_DOMAIN,
            "clusterDNS": [DNS_ADDRESS],
            "resolvConf": str(self.workdir / "resolv.conf"),
            "podLogsDir": str(self.workdir / "pod-logs"),
            # A shared development disk must not make the kubelets evict or delete images.
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "registerNode": True,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def start_containerd(self, images: Path, seed: Path, *, timeout: float) -> None:
        for sub in ("containerd", "cni", "cni-ipam", "pod-logs", "kubelet"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        link_root(seed, self.workdir / "containerd" / "root")
        names = image_names(images)
        (self.workdir / "containerd.toml").write_text(self.containerd_config(names["PAUSE_IMAGE"]))
        (self.workdir / "cni" / "10-llmpipe.conflist").write_text(json.dumps(self.cni_conflist()))
        (self.workdir / "resolv.conf").write_text(f"nameserver {DNS_ADDRESS}\n")
        containerd = cp._spawn(
            f"containerd-{self.name}",
            ["containerd", "--config", str(self.workdir / "containerd.toml")],
            self.workdir,
            tie_to_parent=True,
        )
        containerd.binary = shutil.which("containerd") or containerd.binary
        self.components.append(containerd)
        _wait_for(
            f"containerd of {self.name}",
            lambda: self.ctr("version", check=False).returncode == 0,
            containerd,
            timeout,
        )

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def start_kubelet(self, plane: cp.ControlPlane, bin_dir: Path, *, timeout: float) -> None:
        self.ports = {"kubelet": cp.free_port(), "kubelet-healthz": cp.free_port()}
        config = self.workdir / "kubelet.yaml"
        config.write_text(yaml.safe_dump(self.kubelet_config()))
        argv = [
            str(bin_dir / "kubelet"),
            f"--config={config}",
            f"--kubeconfig={plane.kubeconfig}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.node_ip}",
            f"--root-dir={self.workdir / 'kubelet'}",
            f"--cert-dir={self.workdir / 'kubelet' / 'pki'}",
            f"--node-labels={nodes.REAL_NODE_LABEL}=true",
            "--v=1",
        ]
        kubelet = cp._spawn(f"kubelet-{self.name}", argv, self.workdir, tie_to_parent=True)
        self.components.append(kubelet)
        _wait_for(
            f"kubelet of {self.name}",
            lambda: cp._http_ok(f"http://127.0.0.1:{self.ports['kubelet-healthz']}/healthz"),
            kubelet,
            timeout,
        )
        wait.node_ready(plane.client(), self.name, timeout=timeout)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "--address", str(self.socket), "-n", "k8s.io", *args, check=check)

    def stop(self) -> None:
        kubelets = [c for c in self.components if c.name.startswith("kubelet")]
        cp._stop(kubelets)
        if any(c.alive() for c in self.components):  # containerd: end what is left
            for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            deadline = time.monotonic() + 10
            while self.ctr("tasks", "ls", "-q", check=False).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        cp._stop([c for c in self.components if c not in kubelets])
        _run("ip", "link", "del", self.bridge, check=False)
        # The kubelet's volume mounts (secrets, configmaps) and containerd's snapshots.
        mounts = Path("/proc/mounts").read_text().splitlines()
        for line in reversed(mounts):
            target = line.split()[1]
            if target.startswith(str(self.workdir)):
                _run("umount", "-l", target, check=False)
        # Hard links into the seed, and the containers' layers: gigabytes pytest would keep.
        shutil.rmtree(self.workdir / "containerd", ignore_errors=True)


def remove_kubelet_chains() -> None:
    """The kubelet's own iptables chains (KUBE-FIREWALL: drop non-local traffic to
    127.0.0.0/8; KUBE-KUBELET-CANARY), which outlive it; kube-proxy's go with --cleanup."""
    for tool in ("iptables", "ip6tables"):
        for hook in ("INPUT", "OUTPUT"):
            _run(tool, "-D", hook, "-j", "KUBE-FIREWALL", check=False)
        for table in ("filter", "nat", "mangle"):
            for chain in ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY"):
                _run(tool, "-t", table, "-F", chain, check=False)
                _run(tool, "-t", table, "-X", chain, check=False)


# ---------------------------------------------------------------------------- the cluster


@dataclass
class RealCluster:
    """A control plane with real nodes, kube-proxy, cluster DNS and one kwok node."""

    workdir: Path
    plane: cp.ControlPlane
    nodes: list[RealNode]
    images: Path
    node_bin: Path
    network: HostNetwork
    kwok_node: str = ""
    proxy: cp.Component | None = None
    dns: cluster_dns.ClusterDNS | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def image(self) -> dict[str, str]:
        return image_names(self.images)

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        node_names: tuple[str, ...] = ("real-a", "real-b"),
        kwok_node: str = "kwok-a",
        timeout: float = 180.0,
        progress: Any = print,
    ) -> RealCluster:
        began = time.monotonic()
        missing = missing_prerequisites()
        if missing:
            raise cp.MissingBinaries("real nodes need " + ", ".join(missing))
        node_bin = find_node_bin_dir()
        images = find_images_dir()
        planned = [RealNode.plan(n, i + 1, workdir) for i, n in enumerate(node_names)]
        network = HostNetwork([API_ADDRESS, DNS_ADDRESS, *(n.node_ip for n in planned)])
        network.apply()
        cluster: RealCluster | None = None
        try:
            plane = cp.ControlPlane.start(workdir / "control-plane", advertise_address=API_ADDRESS)
            cluster = cls(workdir, plane, planned, images, node_bin, network)
            cluster._boot(timeout=timeout, progress=progress, began=began)
            cluster.kwok_node = kwok_node
            plane.add_node(nodes.NodeSpec(name=kwok_node))
        except BaseException:
            if cluster is not None:
                cluster.stop()
            else:
                network.undo()
            raise
        cluster.timings["ready"] = time.monotonic() - began
        return cluster

    def _boot(self, *, timeout: float, progress: Any, began: float) -> None:
        def mark(what: str) -> None:
            self.timings[what] = time.monotonic() - began
            progress(f"real nodes: {what} ({self.timings[what]:.0f}s)")

        mark("control plane up")
        self.dns = cluster_dns.ClusterDNS(
            DNS_ADDRESS, cluster_dns.api_resolver(self.plane.client(field_manager="cluster-dns"))
        ).start()
        seed = seeded_root(self.images, progress=progress)
        mark("node image store ready")
        wanted = set(self.image.values())
        for node in self.nodes:
            node.start_containerd(self.images, seed, timeout=timeout)
            missing = wanted - set(node.images())
            if missing:
                raise RealNodesError(f"containerd of {node.name} lacks {sorted(missing)}")
        mark(f"{len(self.nodes)} containerds up with the images")
        for node in self.nodes:
            node.start_kubelet(self.plane, self.node_bin, timeout=timeout)
        mark(f"{len(self.nodes)} kubelets Ready")
        # After the nodes: kube-proxy is healthy only once its node exists.
        self._start_proxy(timeout)
        mark("kube-proxy up")

    def _start_proxy(self, timeout: float) -> None:
        health = cp.free_port()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.plane.kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_NETWORK,
            "hostnameOverride": self.nodes[0].name,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{health}",
            "metricsBindAddress": f"127.0.0.1:{cp.free_port()}",
            # Leave the host's conntrack table size and localhost routing alone.
            "conntrack": {"maxPerCore": 0},
            "iptables": {"localhostNodePorts": False},
            "nodePortAddresses": [f"{n.node_ip}/32" for n in self.nodes],
        }
        path = self.workdir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [str(self.node_bin / "kube-proxy"), f"--config={path}", "--v=1"]
        self.proxy = cp._spawn("kube-proxy", argv, self.workdir, tie_to_parent=True)
        _wait_for(
            "kube-proxy",
            lambda: cp._http_ok(f"http://127.0.0.1:{health}/healthz"),
            self.proxy,
            timeout,
        )

    # -- helpers for tests -----------------------------------------------------------------

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.plane.client().list(Pod, namespace="*") if _node_of(p) == node]

    def stop(self) -> None:
        client = self.plane.client()
        real = {n.name for n in self.nodes}
        with contextlib.suppress(Exception):
            for pod in client.list(Pod, namespace="*"):
                if _node_of(pod) in real and pod.metadata and pod.metadata.name:
                    with contextlib.suppress(Exception):
                        client.delete(Pod, pod.metadata.name, namespace=pod.metadata.namespace)
            with contextlib.suppress(wait.WaitTimeout):
                wait.until(
                    lambda: not any(_node_of(p) in real for p in client.list(Pod, namespace="*")),
                    what="the real nodes' pods to stop",
                    timeout=60,
                )
        for node in self.nodes:
            node.stop()
        if self.proxy is not None:
            cp._stop([self.proxy])
            _run(str(self.node_bin / "kube-proxy"), "--cleanup", check=False)
        remove_kubelet_chains()
        if self.dns is not None:
            self.dns.stop()
        self.plane.stop()
        self.network.undo()

    def alive(self) -> list[str]:
        parts = [*self.plane.components, *(c for n in self.nodes for c in n.components)]
        if self.proxy is not None:
            parts.append(self.proxy)
        return [c.name for c in parts if c.alive()]


@contextlib.contextmanager
def running(workdir: Path, **options: Any) -> Iterator[RealCluster]:
    cluster = RealCluster.start(workdir, **options)
    try:
        yield cluster
    finally:
        cluster.stop()


def all_nodes(cluster: RealCluster) -> list[Node]:
    return list(cluster.plane.client().list(Node))


def _node_of(pod: Pod) -> str | None:
    """The node a pod is bound to (None before it is scheduled)."""
    return pod.spec.nodeName if pod.spec else None
