"""`llmpipe profile` and `llmpipe plan`: will my model fit on my devices, and how fast?

I/O edge of the planner: reads the cluster YAML (or, with `--kubeconfig` / `--context`,
the live cluster's Nodes as the operator reads them) and the model files, calls the pure
`planning` package, prints a table, JSON or YAML. Exit codes: 0 planned, 2 bad input,
3 infeasible (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from llmpipe_cli import modelfiles
from llmpipe_operator.planning import cost, devices, inventory, live, planner, profiles

EXIT_OK, EXIT_BAD_INPUT, EXIT_INFEASIBLE = 0, 2, 3


class BadInput(Exception):
    """Anything the user can fix in the command line or the files it names."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # argparse: usage errors exit 2, --help exits 0
        return int(exit_.code or 0)
    try:
        return int(args.run(args, sys.stdout))
    except BadInput as error:
        print(f"llmpipe {args.command}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except planner.PlanInfeasible as error:
        print(f"llmpipe plan: infeasible: {error}", file=sys.stderr)
        return EXIT_INFEASIBLE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    profile = commands.add_parser(
        "profile",
        help="print a model's profile (bytes per layer, KV cache per token) as JSON",
        description="Print the profile of a model directory (safetensors headers), a "
        "config.json or a GGUF file (its weights dequantized to --dtype, default float32), "
        "in the profile JSON format of docs/design.md.",
    )
    profile.add_argument("model", metavar="MODEL_DIR_CONFIG_OR_GGUF", type=Path)
    _dtype_option(profile)
    profile.add_argument("-o", "--output", choices=("json", "yaml"), default="json")
    profile.set_defaults(run=run_profile)

    plan = commands.add_parser(
        "plan",
        help="plan a pipeline of a model over a cluster file or a live cluster",
        description="Compute the best pipeline of MODEL over the nodes of a cluster file, "
        "or of a live cluster read as the operator reads it (cost model v2). Exit codes: "
        "0 planned, 2 bad input, 3 infeasible.",
    )
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--cluster", type=Path, help="cluster YAML file")
    source.add_argument(
        "--kubeconfig",
        type=Path,
        help="plan on this cluster's Nodes (labels, measured facts, links, the memory others "
        "hold), exactly as the operator would for a new pipeline; read only",
    )
    plan.add_argument(
        "--selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_label,
        help="with --kubeconfig: only nodes with this label, like spec.placement.nodeSelector "
        "(repeatable)",
    )
    plan.add_argument(
        "--context",
        help="kubeconfig context (default: the current one); without --kubeconfig, "
        "$KUBECONFIG or ~/.kube/config",
    )
    plan.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model directory, config.json, GGUF file, or profile JSON (`llmpipe profile`)",
    )
    _dtype_option(plan)
    plan.add_argument(
        "--draft-model",
        type=Path,
        default=None,
        metavar="PATH",
        help="spec.model.draft: a draft model (directory, config.json, GGUF file or profile "
        "JSON) that stage 0 holds whole beside its layers; its weights at --dtype (else 2 "
        "bytes a parameter, as stage 0 runs it) and its KV cache for --max-sequences x "
        "--max-context go into stage 0's memory",
    )
    defaults = planner.Workload()
    plan.add_argument("--objective", choices=cost.OBJECTIVES, default=defaults.objective)
    plan.add_argument(
        "--max-sequences",
        type=_positive_int,
        default=defaults.max_sequences,
        metavar="N",
        help=f"sequences in flight (default {defaults.max_sequences})",
    )
    plan.add_argument(
        "--max-context",
        type=_positive_int,
        default=defaults.max_context_tokens,
        metavar="N",
        help=f"tokens per sequence (default {defaults.max_context_tokens})",
    )
    plan.add_argument("--first-stage", choices=("any", "edge"), default="any")
    plan.add_argument("--last-stage", choices=("any", "edge"), default="any")
    plan.add_argument("--max-stages", type=_positive_int, default=None, metavar="N")
    plan.add_argument(
        "--runtime-overhead",
        type=_quantity,
        default=defaults.runtime_overhead_bytes,
        metavar="QTY",
        help="memory per stage besides weights and KV cache (default 512Mi)",
    )
    plan.add_argument(
        "--device",
        choices=devices.DEVICES,
        default="auto",
        help="spec.runtime.device: auto uses a node's GPU (GPU Feature Discovery labels in "
        "the cluster file), cpu never, cuda only GPU nodes (default auto)",
    )
    plan.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    plan.set_defaults(run=run_plan)
    return parser


def _dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default=None,
        help="bfloat16, float16 or float32 (default: as stored, else the config's dtype)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _quantity(text: str) -> int:
    try:
        value = inventory.parse_quantity(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


# profile ------------------------------------------------------------------------------


def run_profile(args: argparse.Namespace, out: TextIO) -> int:
    profile = _load_profile(args.model, dtype=args.dtype)
    if args.model.suffix == ".gguf":
        dtype = args.dtype or modelfiles.GGUF_DEFAULT_DTYPE
        stored = cost.human_bytes(args.model.stat().st_size)
        print(
            f"llmpipe profile: {args.model.name} stores {stored} quantized; this is the "
            f"profile of its weights dequantized to {dtype}, as the stages load them "
            "(--dtype to choose another)",
            file=sys.stderr,
        )
    _dump(profile.to_dict(), args.output, out)
    return EXIT_OK


def _load_profile(path: Path, *, dtype: str | None) -> profiles.ModelProfile:
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    try:
        if dtype is not None:
            dtype = profiles.normalize_dtype(dtype)
        return modelfiles.load_profile(path, dtype=dtype)
    except (modelfiles.ModelFileError, profiles.ProfileError) as error:
        raise BadInput(str(error)) from error


# plan ---------------------------------------------------------------------------------


def run_plan(args: argparse.Namespace, out: TextIO) -> int:
    # 1. read the inputs
    profile = _load_profile(args.model, dtype=args.dtype)
    if args.selector and args.cluster:
        raise BadInput("--selector applies to --kubeconfig (a cluster file lists its nodes)")
    cluster = load_cluster(args.cluster) if args.cluster else load_live(args)
    workload = planner.Workload(
        objective=args.objective,
        max_sequences=args.max_sequences,
        max_context_tokens=args.max_context,
        runtime_overhead_bytes=args.runtime_overhead,
        device=args.device,
        dtype=profiles.normalize_dtype(args.dtype) if args.dtype else devices.DTYPE_AUTO,
    )
    draft = _load_draft(args.draft_model, dtype=args.dtype) if args.draft_model else None
    workload = planner.with_draft(workload, draft)
    placement = planner.Placement(
        first_stage=args.first_stage, last_stage=args.last_stage, max_stages=args.max_stages
    )
    # 2. plan (PlanInfeasible propagates to exit code 3)
    plan = planner.plan_pipeline(profile, cluster, workload=workload, placement=placement)
    # 3. print
    if args.output == "table":
        out.write(render_table(plan, profile=profile, cluster=cluster, workload=workload))
    else:
        _dump(plan.to_dict(), args.output, out)
    return EXIT_OK


def _load_draft(path: Path, *, dtype: str | None) -> profiles.ModelProfile:
    """--draft-model's profile at the dtype stage 0 loads it in: --dtype, else auto's 2
    bytes a parameter (a profile JSON as it is written)."""
    try:
        fixed = path.suffix == ".json" and "layerBytes" in modelfiles.read_json(path)
    except modelfiles.ModelFileError as error:
        raise BadInput(f"--draft-model {error}") from error
    # auto's dtype on a CPU: 2 bytes a parameter, as is every dtype auto picks
    return _load_profile(path, dtype=None if fixed else dtype or devices.CPU_AUTO_DTYPE)


def load_cluster(path: Path) -> inventory.Inventory:
    try:
        # the C loader when libyaml is there: a 200-node fleet parses 10x faster
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as error:
        raise BadInput(f"{path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise BadInput(f"{path}: not valid YAML: {error}") from error
    try:
        return inventory.parse_cluster(data)
    except inventory.InventoryError as error:
        raise BadInput(f"{path}: {error}") from error


def load_live(args: argparse.Namespace) -> inventory.Inventory:
    """The live cluster's eligible nodes: Ready, schedulable, untainted, and matching
    `--selector`."""
    try:
        from llmpipe_operator.reconcile import whatif  # the operator extra: lightkube, kopf
    except ImportError as error:
        raise BadInput(
            f"--kubeconfig needs the operator's packages ({error.name}): pip install "
            "'llmpipe[operator]'"
        ) from error
    try:
        eligibility = live.Eligibility(node_selector=dict(args.selector))
        found = whatif.live_inventory(args.kubeconfig, args.context, eligibility)
    except (OSError, ValueError) as error:
        raise BadInput(f"cluster: {error}") from error
    except whatif.READ_ERRORS as error:
        raise BadInput(f"cluster: cannot read Nodes and Pods: {error}") from error
    for name, reason in sorted(found.excluded.items()):
        print(f"llmpipe plan: node {name} left out: {reason}", file=sys.stderr)
    for note in found.notes:
        print(f"llmpipe plan: {note}", file=sys.stderr)
    return found.inventory


def _dump(data: dict[str, Any], form: str, out: TextIO) -> None:
    if form == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        out.write(yaml.safe_dump(data, sort_keys=False))


def render_table(
    plan: planner.Plan,
    *,
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
) -> str:
    """The plan at a glance: one row per stage, the bottleneck marked, then the totals."""
    count = len(plan.stages)
    batch = cost.micro_batch(workload, count) if plan.objective == "throughput" else 1
    header = [
        "STAGE",
        "NODE",
        "TIER",
        "LAYERS",
        "HOLDS",
        "DEVICE",
        "MEMORY USED / AVAILABLE",
        "COMPUTE ms",
        "TRANSFER ms",
        "",
    ]
    rows = [header]
    for stage in plan.stages:
        node = cluster.node(stage.node)
        holds = "+".join(
            part
            for part, has in (
                ("embed", stage.has_embedding),
                ("draft", stage.draft_memory_bytes > 0),
                ("head", stage.has_head),
            )
            if has
        )
        mark = "<- bottleneck" if stage.index == plan.bottleneck_stage else ""
        rows.append(
            [
                str(stage.index),
                stage.node,
                node.tier,
                f"[{stage.layer_start}, {stage.layer_end})",
                holds or "-",
                stage.device,
                f"{cost.human_bytes(stage.memory_bytes)} / "
                f"{cost.human_bytes(cost.stage_budget(node, workload))}",
                f"{stage.compute_seconds * 1e3:.2f}",
                f"{stage.transfer_seconds * 1e3:.2f}",
                mark,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    title = (
        f"{profile.name}: {profile.num_layers} layers, "
        f"{cost.human_bytes(profile.total_weight_bytes)} of weights; objective {plan.objective}; "
        f"times per step of {batch:.3g} sequences"
    )
    rounds = f"{count} micro-batches" if count > 1 else "one batch"
    summary = [
        f"estimated throughput: {plan.est_tokens_per_second:.1f} tokens/s "
        f"({workload.max_sequences} sequences in flight as {rounds}, "
        f"{plan.bottleneck_seconds * 1e3:.2f} ms per round)",
        f"token latency: {plan.token_latency_seconds * 1e3:.2f} ms",
        _first_token_note(plan, workload),
        *_draft_note(plan),
        _search_note(plan, cluster, profile=profile, workload=workload),
    ]
    return "\n".join([title, "", *lines, "", *summary]) + "\n"


def _first_token_note(plan: planner.Plan, workload: planner.Workload) -> str:
    whole = f"{plan.unchunked_time_to_first_token_seconds * 1e3:.1f} ms"
    if plan.prefill_chunk_tokens == 0:
        return f"time to first token ({workload.prompt}-token prompt): {whole}; prefill chunk: none"
    return (
        f"time to first token ({workload.prompt}-token prompt): "
        f"{plan.chunked_time_to_first_token_seconds * 1e3:.1f} ms with prefill chunks of "
        f"{plan.prefill_chunk_tokens} tokens ({whole} in one step)"
    )


def _draft_note(plan: planner.Plan) -> list[str]:
    """Stage 0's draft model's share of its memory (none without --draft-model)."""
    draft = plan.stages[0].draft_memory_bytes
    if not draft:
        return []
    return [f"draft model on stage 0: {cost.human_bytes(draft)} of its memory (weights + KV cache)"]


def _search_note(
    plan: planner.Plan,
    cluster: inventory.Inventory,
    *,
    profile: profiles.ModelProfile,
    workload: planner.Workload,
) -> str:
    eligible = len(planner.eligible_nodes(profile, cluster, workload))
    if plan.exact:
        return f"search: exact optimum over {eligible} eligible nodes"
    gap = plan.gap
    within = f"within {gap:.2f}x of a lower bound" if gap is not None else "no lower bound"
    return f"search: heuristic over {eligible} eligible nodes, {within}"
