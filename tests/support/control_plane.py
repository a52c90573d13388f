"""A real Kubernetes control plane on loopback for the cluster tests and for developers.

Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (binaries
built by scripts/build-k8s-tools) as local processes on free 127.0.0.1 ports, waits until
each is healthy, writes a kubeconfig for a static admin token, and adds simulated nodes
(tests/support/nodes.py) that kwok keeps Ready and whose pods it marks Running/Ready with
a pod IP. Used by the `control_plane` pytest fixture (tests/cluster/conftest.py) and by
`scripts/control-plane up|down|env`, which runs this module.

What it must not do: touch anything but loopback, its own work directory and the
processes it started (it records their pids and checks /proc before signalling one).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.authentication_v1 import TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Node, ServiceAccount, ServiceAccountToken
from lightkube.types import PatchType

from tests.support import nodes, wait

REPO = Path(__file__).resolve().parents[2]
KWOK_CONFIG = Path(__file__).with_name("kwok.yaml")
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
    "helm",
)
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
STATE_FILE = "state.json"


class ControlPlaneError(RuntimeError):
    """The control plane could not be started; the message names the component and its log."""


class MissingBinaries(ControlPlaneError):
    """The Go binaries are not built (or LLMPIPE_K8S_BIN points to the wrong place)."""


# ---------------------------------------------------------------------------- binaries


def find_bin_dir() -> Path:
    """$LLMPIPE_K8S_BIN, else the cached build of scripts/build-k8s-tools (never builds)."""
    configured = os.environ.get("LLMPIPE_K8S_BIN")
    if configured:
        bin_dir = Path(configured)
    else:
        result = subprocess.run(
            [str(REPO / "scripts" / "build-k8s-tools"), "--dir"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise MissingBinaries(
                "the control-plane binaries are not built: run `scripts/build-k8s-tools` "
                "(a cold build takes ~30 min on 2 cores; `make test` does it for you) or set "
                "LLMPIPE_K8S_BIN to a directory holding "
                + ", ".join(BINARIES)
                + f". ({result.stderr.strip()})"
            )
        bin_dir = Path(result.stdout.strip())
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise MissingBinaries(
            f"LLMPIPE_K8S_BIN={bin_dir} lacks {', '.join(missing)}; "
            'run `scripts/build-k8s-tools` and `eval "$(scripts/build-k8s-tools --env)"`'
        )
    return bin_dir


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child: SIGKILL it when the process that started it dies (Linux only),
    so a killed pytest leaves no control plane behind. SIGKILL, not SIGTERM: all components
    die at once then, and kube-apiserver's graceful shutdown hangs once etcd is gone."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class Component:
    """One started process: its name, pid, the binary it runs and where it logs."""

    name: str
    pid: int
    binary: str
    log: str

    def alive(self) -> bool:
        # The pid might have been reused: only count it if it still runs our binary.
        # /proc/PID/exe is set before exec closes the pipe Popen waits on, while cmdline can
        # still read empty for a moment after Popen returns; a zombie has no exe at all.
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return False
        return exe.removesuffix(" (deleted)") == os.path.realpath(self.binary)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = Path(self.log).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


def _spawn(name: str, argv: list[str], workdir: Path, *, tie_to_parent: bool) -> Component:
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent if tie_to_parent else None,
        )
    return Component(name=name, pid=process.pid, binary=argv[0], log=str(log_path))


def _stop(components: Iterable[Component], *, grace: float = 10.0) -> None:
    """Stop each in the given order, waiting for one to exit before signalling the next
    (kube-apiserver hangs in shutdown if etcd goes first): SIGTERM, then SIGKILL after
    `grace` seconds."""
    for component in components:
        if not component.alive():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(component.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while component.alive() and time.monotonic() < deadline:
            _reap(component.pid)
            time.sleep(0.05)
        if component.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(component.pid, signal.SIGKILL)
        _reap(component.pid)


def _reap(pid: int) -> None:
    """Collect our own exited children so they do not linger as zombies."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ControlPlaneError("openssl is needed to create the control plane's certificates")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(pki: Path, *, extra_ips: Iterable[str] = ()) -> str:
    """A CA, the API server's serving certificate (127.0.0.1, localhost, kubernetes.default,
    plus `extra_ips`), the service-account signing key pair and a static admin token;
    returns the token."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=pki)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-days",
        "30",
        "-subj",
        "/CN=llmpipe-test-ca",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    _openssl(
        "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "apiserver.key", cwd=pki
    )
    _openssl(
        "req",
        "-new",
        "-key",
        "apiserver.key",
        "-subj",
        "/CN=kube-apiserver",
        "-out",
        "apiserver.csr",
        cwd=pki,
    )
    ips = "".join(f"IP:{ip}," for ip in extra_ips)
    (pki / "san.ext").write_text(
        f"subjectAltName=IP:127.0.0.1,IP:10.96.0.1,{ips}DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        "san.ext",
        "-out",
        "apiserver.crt",
        cwd=pki,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    token = secrets.token_hex(24)
    (pki / "tokens.csv").write_text(f'{token},admin,admin-uid,"system:masters"\n')
    return token


def kubeconfig_document(
    server: str, ca_pem: bytes, token: str, *, user: str = "admin"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "llmpipe-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": f"{user}@llmpipe-test", "context": {"cluster": "llmpipe-test", "user": user}}
        ],
        "current-context": f"{user}@llmpipe-test",
    }


# ---------------------------------------------------------------------------- health


def _http_ok(url: str, *, context: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _insecure() -> ssl.SSLContext:
    # Controller manager and scheduler serve /healthz with self-signed certificates.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------------- control plane


@dataclass
class ControlPlane:
    """A running control plane. Build one with `ControlPlane.start(...)`; `stop()` ends it."""

    workdir: Path
    bin_dir: Path
    server: str
    token: str
    ports: dict[str, int]
    components: list[Component] = field(default_factory=list)
    ready_seconds: float = 0.0
    advertise_address: str | None = None
    """Set when pods on real nodes must reach the API server (tests/support/real_nodes.py):
    it then listens on this address instead of 127.0.0.1, and the `kubernetes` Service
    points at it."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds from the start until each component (and the nodes) became healthy."""
    _began: float = field(default=0.0, repr=False)
    _client: Client | None = field(default=None, repr=False)

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        bin_dir: Path | None = None,
        cluster_file: Path | None = None,
        tie_to_parent: bool = True,
        timeout: float = 90.0,
        advertise_address: str | None = None,
    ) -> ControlPlane:
        """Start every component, wait until healthy, then add the cluster file's nodes.

        `tie_to_parent` ends the processes with the caller (pytest); the CLI turns it off so
        the control plane outlives `scripts/control-plane up`. `advertise_address` (a local,
        non-loopback address) makes the API server reachable from pods on real nodes.
        """
        began = time.monotonic()
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        bin_dir = bin_dir or find_bin_dir()
        token = make_pki(
            workdir / "pki", extra_ips=[advertise_address] if advertise_address else []
        )
        ports = {
            name: free_port()
            for name in (
                "etcd",
                "etcd-peer",
                "apiserver",
                "controller-manager",
                "scheduler",
                "kwok",
            )
        }
        plane = cls(
            workdir=workdir,
            bin_dir=bin_dir,
            token=token,
            ports=ports,
            server=f"https://{advertise_address or '127.0.0.1'}:{ports['apiserver']}",
            advertise_address=advertise_address,
        )
        plane._began = began
        try:
            plane._boot(tie_to_parent=tie_to_parent, timeout=timeout)
            if cluster_file is not None:
                plane.add_nodes_from_file(cluster_file)
                plane.timings["nodes Ready"] = time.monotonic() - began
        except BaseException:
            plane.stop()
            raise
        plane.ready_seconds = time.monotonic() - began
        plane.save_state()
        return plane

    def _boot(self, *, tie_to_parent: bool, timeout: float) -> None:
        pki = self.workdir / "pki"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                kubeconfig_document(self.server, (pki / "ca.crt").read_bytes(), self.token)
            )
        )
        self._run("etcd", self._etcd_args(), tie_to_parent)
        self._await(
            "etcd", lambda: _http_ok(f"http://127.0.0.1:{self.ports['etcd']}/health"), timeout
        )
        self._run("kube-apiserver", self._apiserver_args(pki), tie_to_parent)
        ca = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._await(
            "kube-apiserver",
            lambda: _http_ok(f"{self.server}/readyz", context=ca, token=self.token),
            timeout,
        )
        self._run("kube-controller-manager", self._controller_manager_args(pki), tie_to_parent)
        self._run("kube-scheduler", self._scheduler_args(), tie_to_parent)
        self._run("kwok", self._kwok_args(), tie_to_parent)
        insecure = _insecure()
        self._await(
            "kube-controller-manager",
            lambda: _http_ok(
                f"https://127.0.0.1:{self.ports['controller-manager']}/healthz", context=insecure
            ),
            timeout,
        )
        self._await(
            "kube-scheduler",
            lambda: _http_ok(
                f"https://127.0.0.1:{self.ports['scheduler']}/healthz", context=insecure
            ),
            timeout,
        )
        self._await(
            "kwok", lambda: _http_ok(f"http://127.0.0.1:{self.ports['kwok']}/healthz"), timeout
        )
        # Proves the controller manager's controllers run (and that pods in `default` pass
        # ServiceAccount admission from now on).
        wait.service_account(self.client(), "default", timeout=timeout)
        self.timings["default ServiceAccount"] = time.monotonic() - self._began

    def _run(self, name: str, args: list[str], tie_to_parent: bool) -> None:
        argv = [str(self.bin_dir / name), *args]
        self.components.append(_spawn(name, argv, self.workdir, tie_to_parent=tie_to_parent))

    def _await(self, name: str, healthy: Any, timeout: float) -> None:
        component = next(c for c in self.components if c.name == name)
        deadline = time.monotonic() + timeout
        while not healthy():
            if not component.alive():
                raise ControlPlaneError(
                    f"{name} exited during start-up; last lines of {component.log}:\n"
                    + component.log_tail()
                )
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{name} not healthy after {timeout:.0f}s; last lines of {component.log}:\n"
                    + component.log_tail()
                )
            time.sleep(0.1)
        self.timings[name] = time.monotonic() - self._began

    def stop(self) -> None:
        """Stop every component (kwok and controllers first, etcd last)."""
        if self._client is not None:
            self._client = None
        _stop(reversed(self.components))
        state = self.workdir / STATE_FILE
        if state.exists():
            state.unlink()

    def alive(self) -> list[str]:
        return [c.name for c in self.components if c.alive()]

    # -- component flags -----------------------------------------------------------------

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            "--name=llmpipe",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=llmpipe={peer}",
            # Test data is thrown away: skipping fsync makes every API write much cheaper.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, pki: Path) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            f"--bind-address={self.advertise_address or '127.0.0.1'}",
            f"--advertise-address={self.advertise_address or '127.0.0.1'}",
            f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            # As kubeadm does: reach kubelets (logs, exec) by their address, not their name,
            # which no resolver here knows (tests/support/real_nodes.py).
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--profiling=false",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
        ]

    def _controller_manager_args(self, pki: Path) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self.workdir / 'controller-manager-certs'}",
            # Signs legacy service-account token Secrets and publishes kube-root-ca.crt.
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--controllers=*",
            "--profiling=false",
        ]

    def _scheduler_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--profiling=false",
        ]

    def _kwok_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={KWOK_CONFIG}",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
        ]

    # -- access --------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (kubectl, helm, the operator): KUBECONFIG and PATH."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LLMPIPE_K8S_BIN": str(self.bin_dir),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def client(self, *, field_manager: str | None = None) -> Client:
        """A lightkube Client with the admin token (a fresh one when field_manager is given)."""
        if field_manager is not None:
            return Client(KubeConfig.from_file(self.kubeconfig), field_manager=field_manager)
        if self._client is None:
            self._client = Client(KubeConfig.from_file(self.kubeconfig))
        return self._client

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, path: Path | None = None, seconds: int = 3600
    ) -> Path:
        """A kubeconfig that acts as the ServiceAccount (a TokenRequest-bound token), for
        running a component under least-privilege RBAC instead of as admin."""
        request = ServiceAccountToken(
            metadata=ObjectMeta(name=name, namespace=namespace),
            spec=TokenRequestSpec(audiences=[SERVICE_ACCOUNT_ISSUER], expirationSeconds=seconds),
        )
        issued = self.client().create(request, name, namespace=namespace)
        if issued.status is None or not issued.status.token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        token = issued.status.token
        path = path or self.workdir / f"kubeconfig-{namespace}-{name}"
        ca = (self.workdir / "pki" / "ca.crt").read_bytes()
        document = kubeconfig_document(self.server, ca, token, user=f"{namespace}-{name}")
        path.write_text(yaml.safe_dump(document))
        return path

    # -- namespaces ----------------------------------------------------------------------

    def create_namespace(self, name: str, *, timeout: float = wait.DEFAULT_TIMEOUT) -> Namespace:
        """Create a namespace and wait for its `default` ServiceAccount, without which
        ServiceAccount admission rejects every pod created there."""
        namespace = self.client().create(Namespace(metadata=ObjectMeta(name=name)))
        wait.service_account(self.client(), name, timeout=timeout)
        return namespace

    def delete_namespace(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.client().delete(Namespace, name)

    def ensure_service_account(self, namespace: str, name: str) -> ServiceAccount:
        try:
            return self.client().get(ServiceAccount, name, namespace=namespace)
        except ApiError as error:
            if error.status.code != 404:
                raise
        return self.client().create(
            ServiceAccount(metadata=ObjectMeta(name=name)), namespace=namespace
        )

    # -- nodes ---------------------------------------------------------------------------

    def add_node(
        self,
        spec: nodes.NodeSpec | str,
        *,
        wait_ready: bool = True,
        timeout: float = wait.DEFAULT_TIMEOUT,
        **fields: Any,
    ) -> Node:
        """Register a simulated node (like a kubelet would) and wait until kwok makes it Ready.

        `add_node("edge-1", tier="edge", memory="8Gi")` or `add_node(NodeSpec(...))`.
        """
        if isinstance(spec, str):
            spec = nodes.NodeSpec(name=spec, **fields)
        manifest = nodes.node_manifest(spec)
        client = self.client()
        client.create(Node.from_dict(manifest))  # type: ignore[call-overload]
        # A kubelet reports capacity in status; set it through the status subresource so it
        # holds whether or not create kept it and whatever kwok wrote first.
        client.patch(
            Node.Status, spec.name, {"status": manifest["status"]}, patch_type=PatchType.MERGE
        )
        if wait_ready:
            return wait.node_ready(client, spec.name, timeout=timeout)
        return client.get(Node, spec.name)

    def add_nodes_from_file(
        self, path: Path, *, prefix: str = "", wait_ready: bool = True
    ) -> list[Node]:
        """Add every node of a cluster file (docs/design.md format); `prefix` renames nodes (and
        their links) so several tests can load the same file without clashing."""
        data = yaml.safe_load(Path(path).read_text())
        specs = nodes.parse_cluster(data if isinstance(data, Mapping) else {})
        if prefix:
            specs = [_prefixed(spec, prefix) for spec in specs]
        added = [self.add_node(spec, wait_ready=False) for spec in specs]
        if wait_ready:
            added = [wait.node_ready(self.client(), spec.name) for spec in specs]
        return added

    def remove_node(self, name: str, *, timeout: float = wait.DEFAULT_TIMEOUT) -> None:
        """Delete the Node (as when a machine leaves); its pods are removed by the
        controller manager's pod garbage collector, as in a real cluster."""
        with contextlib.suppress(ApiError):
            self.client().delete(Node, name)
        wait.deleted(self.client(), Node, name, timeout=timeout)

    def cordon(self, name: str, *, unschedulable: bool = True) -> Node:
        """`kubectl cordon` (or uncordon with unschedulable=False)."""
        return self.client().patch(
            Node,
            name,
            {"spec": {"unschedulable": unschedulable or None}},
            patch_type=PatchType.MERGE,
        )

    def set_not_ready(self, name: str, *, timeout: float = wait.DEFAULT_TIMEOUT) -> Node:
        """Make the node Ready=False and keep it so.

        kwok re-initialises any managed node whose Ready is not True, so patching the
        condition directly is undone within a second. Instead the node gets the label
        `test.llmpipe.io/not-ready=true`: our kwok stages (tests/support/kwok.yaml) then stop
        its heartbeat and set Ready=False with reason KubeletNotReady, and the node
        lifecycle controller taints it `node.kubernetes.io/not-ready` as for a real failure.
        """
        self.client().patch(
            Node,
            name,
            {"metadata": {"labels": {nodes.NOT_READY_LABEL: "true"}}},
            patch_type=PatchType.MERGE,
        )
        return wait.node_condition(self.client(), name, status="False", timeout=timeout)

    def set_ready(self, name: str, *, timeout: float = wait.DEFAULT_TIMEOUT) -> Node:
        """Undo set_not_ready: kwok's node-initialize stage makes the node Ready again, and
        the node lifecycle controller lifts its not-ready taints."""
        self.client().patch(
            Node,
            name,
            {"metadata": {"labels": {nodes.NOT_READY_LABEL: None}}},
            patch_type=PatchType.MERGE,
        )
        return wait.node_ready(self.client(), name, timeout=timeout)

    # -- state for the CLI ---------------------------------------------------------------

    def save_state(self) -> None:
        state = {
            "server": self.server,
            "token": self.token,
            "binDir": str(self.bin_dir),
            "ports": self.ports,
            "readySeconds": round(self.ready_seconds, 2),
            "components": [c.__dict__ for c in self.components],
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> ControlPlane:
        state = json.loads((Path(workdir) / STATE_FILE).read_text())
        return cls(
            workdir=Path(workdir),
            bin_dir=Path(state["binDir"]),
            server=state["server"],
            token=state["token"],
            ports=state["ports"],
            components=[Component(**c) for c in state["components"]],
            ready_seconds=state["readySeconds"],
        )


def _prefixed(spec: nodes.NodeSpec, prefix: str) -> nodes.NodeSpec:
    links = {prefix + peer: facts for peer, facts in spec.links.items()}
    return nodes.NodeSpec(**{**spec.__dict__, "name": prefix + spec.name, "links": links})


@contextlib.contextmanager
def running(workdir: Path, **options: Any) -> Iterator[ControlPlane]:
    """`with running(tmp) as plane:` starts a control plane and always stops it."""
    plane = ControlPlane.start(workdir, **options)
    try:
        yield plane
    finally:
        plane.stop()


# ---------------------------------------------------------------------------- CLI


def default_workdir() -> Path:
    return Path(os.environ.get("LLMPIPE_CONTROL_PLANE_DIR", "/tmp/llmpipe-control-plane"))


def _env_lines(plane: ControlPlane) -> str:
    return (
        f"export KUBECONFIG={plane.kubeconfig}\n"
        f"export LLMPIPE_K8S_BIN={plane.bin_dir}\n"
        f'export PATH="{plane.bin_dir}:$PATH"\n'
    )


def _up(workdir: Path, cluster: Path | None) -> int:
    if (workdir / STATE_FILE).exists():
        previous = ControlPlane.load(workdir)
        if previous.alive():
            print(
                f"control-plane: already up in {workdir} ({', '.join(previous.alive())}); "
                "run `scripts/control-plane down` first",
                file=sys.stderr,
            )
            return 1
        previous.stop()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / "pki" / "tokens.csv").exists():
            print(
                f"control-plane: {workdir} is not empty and not a control-plane directory; "
                "refusing to reuse it (pass another --dir)",
                file=sys.stderr,
            )
            return 1
        shutil.rmtree(workdir)  # the previous, stopped plane's etcd data, logs and keys
    print(f"control-plane: starting in {workdir} ...", file=sys.stderr)
    plane = ControlPlane.start(workdir, cluster_file=cluster, tie_to_parent=False)
    nodes_count = len(list(plane.client().list(Node)))
    print(
        f"control-plane: ready in {plane.ready_seconds:.1f}s at {plane.server} "
        f"({nodes_count} nodes); logs in {workdir / 'logs'}",
        file=sys.stderr,
    )
    print(_env_lines(plane), end="")
    return 0


def _down(workdir: Path) -> int:
    if not (workdir / STATE_FILE).exists():
        print(f"control-plane: nothing running in {workdir}", file=sys.stderr)
        return 0
    plane = ControlPlane.load(workdir)
    plane.stop()
    print(f"control-plane: stopped ({workdir})", file=sys.stderr)
    return 0


def _env(workdir: Path) -> int:
    if not (workdir / STATE_FILE).exists():
        print(
            f"control-plane: not up in {workdir}; run `scripts/control-plane up`", file=sys.stderr
        )
        return 1
    print(_env_lines(ControlPlane.load(workdir)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/control-plane", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=("up", "down", "env"))
    parser.add_argument(
        "--cluster", type=Path, help="cluster file (docs/design.md format) whose nodes to add"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=default_workdir(),
        help="work directory (default $LLMPIPE_CONTROL_PLANE_DIR or /tmp/llmpipe-control-plane)",
    )
    args = parser.parse_args(argv)
    workdir = args.dir.resolve()
    try:
        if args.command == "up":
            return _up(workdir, args.cluster)
        if args.command == "down":
            return _down(workdir)
        return _env(workdir)
    except (ControlPlaneError, nodes.ClusterFileError) as error:
        print(f"control-plane: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
