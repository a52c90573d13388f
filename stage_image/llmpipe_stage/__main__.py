"""`python -m llmpipe_stage --config-dir DIR --stage-index N --model-dir DIR`: run one stage.

The container contract: the config dir is the mounted plan ConfigMap (`plan.json`,
`pipeline.json`); `LLMPIPE_STAGE_INDEX` may replace `--stage-index`; gRPC listens on 50051
and HTTP on 8000 unless `--grpc-port` / `--http-port` say otherwise (local multi-process runs).
Stage links are mutual TLS: `--tls-dir` (or env LLMPIPE_TLS_DIR) holds `ca.crt`, `tls.crt`
and `tls.key` (the mounted stage Secret); `--plaintext` turns TLS and the per-RPC checks off
(an explicit opt-out for benchmarks; never in a shared cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from llmpipe_stage import api_requests
from llmpipe_stage import config as stage_config

OMP_WAIT_POLICY = "PASSIVE"
"""The stage's OpenMP wait policy unless the environment sets one. With the default
(active) policy an idle OpenMP thread spins for a while after every parallel region; when
the stage shares its cores (other stages of `llmpipe serve`, other pods, a CPU limit) the
spinning threads take the time the working thread needs, and a 2-thread decode step on a
loaded 2-core machine took 7x the CPU time and up to 14x the wall time of the passive
policy's (docs/benchmarks.md, "Decode speed")."""


def sleep_between_parallel_regions() -> None:
    """Set OMP_WAIT_POLICY before torch (and its OpenMP runtime) is loaded; a value the
    environment gives wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)


def _add_placement(parser: argparse.ArgumentParser) -> None:
    """Which stage this is, of which plan and model, and where it listens."""
    parser.add_argument(
        "--config-dir", type=Path, required=True, help="directory with plan.json and pipeline.json"
    )
    parser.add_argument(
        "--stage-index",
        type=int,
        default=int(os.environ["LLMPIPE_STAGE_INDEX"])
        if os.environ.get("LLMPIPE_STAGE_INDEX", "").isdigit()
        else None,
        help="this stage's index in the plan (or env LLMPIPE_STAGE_INDEX)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        required=True,
        help="model directory: config.json, tokenizer files, *.safetensors",
    )
    parser.add_argument(
        "--draft-model-dir",
        type=Path,
        default=Path(os.environ["LLMPIPE_DRAFT_MODEL_DIR"])
        if os.environ.get("LLMPIPE_DRAFT_MODEL_DIR")
        else None,
        help="stage 0 with workload.speculation 'draft': the draft model's directory (same "
        "tokenizer; run whole in stage 0) (or env LLMPIPE_DRAFT_MODEL_DIR)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (50051)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="HTTP port for health, metrics and (stage 0) the OpenAI API (8000)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )


def _add_timing(parser: argparse.ArgumentParser) -> None:
    """Timeouts and the ring's shape."""
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=30.0,
        help="seconds stage 0 waits for a token before pausing the sequences (a stage is stuck)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=25.0,
        help="on SIGTERM, seconds the stage keeps serving what it holds (stage 0 refuses "
        "new requests) before it stops (25: inside the kubelet's 30 s grace period)",
    )
    parser.add_argument(
        "--resume-timeout",
        type=float,
        default=60.0,
        help="seconds paused sequences wait for every stage to be ready again before "
        "their requests fail (0: fail at once)",
    )
    parser.add_argument(
        "--cache-timeout",
        type=float,
        default=300.0,
        help="seconds after which an unused KV cache is freed",
    )
    parser.add_argument(
        "--forward-timeout",
        type=float,
        default=10.0,
        help="deadline of one stage-to-stage call in seconds",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to compute when the plan names no device (auto: a CUDA GPU if torch "
        "sees one, else the CPU); a plan stage's device wins",
    )
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches kept in the ring (default: one per stage)",
    )


def _add_api(parser: argparse.ArgumentParser) -> None:
    """Stage 0's OpenAI API: prompt limit and keys."""
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=api_requests.DEFAULT_MAX_PROMPT_CHARS,
        help="stage 0 refuses longer prompts (HTTP 400) before tokenizing them "
        f"({api_requests.DEFAULT_MAX_PROMPT_CHARS})",
    )
    parser.add_argument(
        "--api-keys",
        type=Path,
        default=None,
        help="stage 0: a file or directory of API keys (one per line); the OpenAI routes "
        "then need 'Authorization: Bearer <key>'; re-read when the files change",
    )
    parser.add_argument(
        "--protect-metrics",
        action="store_true",
        help="with --api-keys, /metrics needs a key too (default: open; it holds no text)",
    )


def _add_links(parser: argparse.ArgumentParser) -> None:
    """The stage links: mutual TLS, or an explicit opt-out."""
    links = parser.add_mutually_exclusive_group()
    links.add_argument(
        "--tls-dir",
        type=Path,
        default=Path(os.environ["LLMPIPE_TLS_DIR"]) if os.environ.get("LLMPIPE_TLS_DIR") else None,
        help="directory with ca.crt, tls.crt, tls.key for mutual TLS between the stages "
        "(or env LLMPIPE_TLS_DIR)",
    )
    links.add_argument(
        "--plaintext",
        action="store_true",
        help="no TLS and no per-RPC checks on the stage links (benchmarks only: anyone who "
        "can reach the gRPC port can then drive the stage)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmpipe-stage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (_add_placement, _add_timing, _add_api, _add_links):
        add(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.stage_index is None:
        parser.error("--stage-index (or LLMPIPE_STAGE_INDEX) is required")
    if args.max_prompt_chars < 1:
        parser.error("--max-prompt-chars must be at least 1")
    if args.plaintext:
        args.tls_dir = None
    elif args.tls_dir is None:
        parser.error(
            "stage links are mutual TLS: give --tls-dir (or LLMPIPE_TLS_DIR), or opt out "
            "explicitly with --plaintext"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s stage {args.stage_index} %(levelname)s %(message)s",
    )
    try:
        pipeline = stage_config.read_config_dir(args.config_dir)
    except stage_config.ConfigError as error:
        print(f"llmpipe-stage: {error}", file=sys.stderr)
        return 2
    if not 0 <= args.stage_index < pipeline.num_stages:
        print(
            f"llmpipe-stage: --stage-index {args.stage_index} is not in the plan's "
            f"{pipeline.num_stages} stages",
            file=sys.stderr,
        )
        return 2
    sleep_between_parallel_regions()
    from llmpipe_stage import server  # imports torch; after argument errors are reported

    settings = server.StageSettings(
        stage_index=args.stage_index,
        pipeline=pipeline,
        model_dir=args.model_dir,
        draft_model_dir=args.draft_model_dir,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        threads=args.threads,
        device=args.device,
        forward_timeout_s=args.forward_timeout,
        step_timeout_s=args.step_timeout,
        resume_timeout_s=args.resume_timeout,
        drain_timeout_s=args.drain_timeout,
        cache_timeout_s=args.cache_timeout,
        attn_implementation=args.attn_implementation,
        micro_batches=args.micro_batches,
        max_prompt_chars=args.max_prompt_chars,
        api_keys=args.api_keys,
        protect_metrics=args.protect_metrics,
        tls_dir=args.tls_dir,
    )
    from llmpipe_stage import tls

    try:
        return asyncio.run(server.serve(settings))
    except tls.TlsError as error:
        print(f"llmpipe-stage: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
