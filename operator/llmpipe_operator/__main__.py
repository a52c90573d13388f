"""`python -m llmpipe_operator`: run the operator (Kopf) with its health and metrics ports.

    python -m llmpipe_operator --namespace team-a [--namespace team-b ...]
    python -m llmpipe_operator --all-namespaces
        [--policy FILE] [--health-port 8081] [--metrics-port 8080] [--verbose]
        [--stage-cert-validity SECONDS] [--stage-cert-renew-fraction F]

--policy: the cluster admin's policy as JSON (the chart mounts it from the values'
`policy:`); without it, the built-in safe default (only the project's stage image, host
paths only under /var/lib/llmpipe/models).

Credentials: $KUBECONFIG (or ~/.kube/config), else the in-cluster ServiceAccount.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

import kopf

from llmpipe_common import pki
from llmpipe_operator import main as handlers  # noqa: F401  (registers the handlers)
from llmpipe_operator import policy, telemetry
from llmpipe_operator.reconcile import certs, fetch, measure, probes


def _add_scope(parser: argparse.ArgumentParser) -> None:
    """What the operator watches and where it answers probes and scrapes."""
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        metavar="NS",
        help="watch LLMPipelines in this namespace (repeatable)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch LLMPipelines in every namespace (needs cluster-wide RBAC)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=8081,
        help="liveness endpoint GET /healthz (0 = off; default 8081)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="Prometheus metrics GET /metrics (0 = off; default 8080)",
    )


def _add_certificates(parser: argparse.ArgumentParser) -> None:
    """The stages' certificates and the admin's policy."""
    defaults = pki.Validity()
    parser.add_argument(
        "--stage-cert-validity",
        type=float,
        default=defaults.leaf_seconds,
        metavar="SECONDS",
        help=f"lifetime of the stages' TLS certificates (default {defaults.leaf_seconds:g} "
        "= 30 days)",
    )
    parser.add_argument(
        "--stage-cert-renew-fraction",
        type=float,
        default=defaults.renew_fraction,
        metavar="F",
        help="renew a stage certificate after this fraction of its lifetime (default 2/3)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="the cluster's llmpipe policy, JSON (default: only the project's stage image, "
        "host paths under /var/lib/llmpipe/models)",
    )


def _add_probes(parser: argparse.ArgumentParser) -> None:
    """The node probes' figures."""
    parser.add_argument(
        "--probe-namespace",
        metavar="NS",
        help="read the node probes (pods labelled app.kubernetes.io/component=node-probe) in "
        "this namespace and write their figures to the Nodes (default: off)",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between reads of the node probes (default 60)",
    )
    parser.add_argument(
        "--probe-links-interval",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds between re-measurements of each pair's link (default 3600)",
    )


def _add_measuring(parser: argparse.ArgumentParser) -> None:
    """The serving stages' own figures into status.measured."""
    parser.add_argument(
        "--measure-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between reads of the stages' /metrics for status.measured "
        "(default 30; 0: off)",
    )
    parser.add_argument(
        "--operator-namespace",
        metavar="NS",
        help="the namespace the operator runs in: pipelines' NetworkPolicies admit its pods "
        "to the stages' HTTP port, so it can read their /metrics (default: no such rule)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe_operator", description="Run the llmpipe operator."
    )
    for add in (_add_scope, _add_certificates, _add_probes, _add_measuring):
        add(parser)
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.measure_interval < 0:
        parser.error("--measure-interval must be 0 (off) or more")
    for port in (args.health_port, args.metrics_port):
        if not 0 <= port <= 65535:
            parser.error(f"port {port} is out of range 0-65535")
    try:
        args.validity = pki.Validity(
            leaf_seconds=args.stage_cert_validity, renew_fraction=args.stage_cert_renew_fraction
        )
    except pki.PkiError as error:
        parser.error(f"--stage-cert-*: {error}")
    return args


def load_policy(path: Path | None) -> policy.Policy:
    """The policy file's content (json.JSONDecodeError and PolicyError are ValueErrors)."""
    if path is None:
        return policy.default_policy()
    return policy.parse_policy(json.loads(path.read_text()))


async def run(args: argparse.Namespace) -> None:
    certs.configure(args.validity)
    probes.configure(
        probes.ProbeSettings(
            namespace=args.probe_namespace,
            poll_seconds=args.probe_interval,
            links_seconds=args.probe_links_interval,
        )
        if args.probe_namespace
        else None
    )
    measure.configure(
        measure.MeasureSettings(
            interval_seconds=args.measure_interval, operator_namespace=args.operator_namespace
        )
    )
    metrics = await telemetry.serve(args.metrics_port) if args.metrics_port else None
    try:
        await kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=args.namespace or (),
            standalone=True,
            liveness_endpoint=(
                f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
            ),
        )
    finally:
        if metrics is not None:
            await metrics.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rules = load_policy(args.policy)
    except (OSError, ValueError) as error:
        print(
            f"python -m llmpipe_operator: error: --policy {args.policy}: {error}", file=sys.stderr
        )
        return 2
    # Kopf sets up logging (its own format, object prefixes); the HTTP client's per-request
    # lines are noise at INFO.
    kopf.configure(verbose=args.verbose, log_prefix=True)
    fetch.configure_policy(rules)
    logging.getLogger(__name__).info(
        "policy: profiles %s (default %s), images %s, host paths %s",
        ", ".join(sorted(rules.profiles)),
        rules.default_profile,
        ", ".join(rules.allowed_images) or "none",
        ", ".join(p or "/" for p in rules.allowed_host_paths) or "none",
    )
    logging.getLogger("httpx2").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
