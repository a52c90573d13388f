"""Peer benchmark: llmpipe against llama.cpp on the same CPU, same model, same requests.

    PYTHONPATH=.:operator:stage_image python bench/peer.py            # everything
    PYTHONPATH=.:operator:stage_image python bench/peer.py --build-only

llama.cpp is built (CPU backend + RPC backend: `llama-server` and `ggml-rpc-server`) from the
source tree that the `llama-cpp-python` sdist on PyPI vendors, cached by version under
~/.cache/llmpipe/llamacpp/<version>; nothing of it is a dependency of llmpipe. The benchmark
model (a random Llama, hidden 1024, 16 layers, 16/4 heads, vocab 16000, ~213 M parameters,
with a SentencePiece tokenizer trained locally) is converted to GGUF with the vendored
`convert_hf_to_gguf.py` (f32, bf16, q8_0). Both systems are driven over HTTP (OpenAI
completions, greedy, ignore_eos) and measured alternately, round by round, so both see the
same machine load:

- one process: `llmpipe serve --stages 1` vs `llama-server`;
- split over 2 processes: `llmpipe serve --stages 2` vs `llama-server --rpc` over 2
  `ggml-rpc-server` processes (each holding half the layers);
- 1 and 4 sequences in flight, fp32, bf16 and int8 (llmpipe weight-only int8 vs Q8_0);
- decode tok/s, time to first token at a 512-token prompt, peak RSS of all processes.

It prints the ratios (llmpipe / llama.cpp) and, as its last line,
`peer: bf16 one-process 1seq=R 4seq=R; split 1seq=R 4seq=R`.
Figures are printed, never asserted; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import sys

# bench/ also holds operator.py, which would shadow the stdlib `operator` module.
if sys.path and sys.path[0].rstrip("/").endswith("bench"):
    del sys.path[0]

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMPIPE_CACHE", Path.home() / ".cache" / "llmpipe")) / "llamacpp"
TARGETS = ("llama-server", "ggml-rpc-server")


def say(text: str) -> None:
    print(f"[peer] {text}", file=sys.stderr, flush=True)


# -- building llama.cpp ---------------------------------------------------------------------------
def sdist() -> Path:
    """The newest llama-cpp-python sdist (downloaded once; later runs reuse the newest held)."""
    folder = CACHE / "sdist"
    held = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if held:
        return held[-1]
    say("downloading the llama-cpp-python sdist (pip download --no-binary :all:) ...")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "llama-cpp-python",
            "-d",
            str(folder),
        ],
        check=True,
    )
    return sorted(folder.glob("llama_cpp_python-*.tar.gz"))[-1]


def ensure_tools() -> None:
    """cmake and a C++ compiler (apt-get on a bare Debian machine, as root)."""
    missing = [tool for tool in ("cmake", "c++", "make") if shutil.which(tool) is None]
    if not missing:
        return
    say(f"installing build tools ({', '.join(missing)}) with apt-get ...")
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "cmake", "build-essential"], check=True)


def build_llamacpp() -> Path:
    """Build llama-server and ggml-rpc-server once per sdist version; returns the bin folder."""
    archive = sdist()
    version = archive.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    home = CACHE / version
    binaries = home / "build" / "bin"
    if all((binaries / target).is_file() for target in TARGETS):
        return binaries
    ensure_tools()
    source = home / "src"
    if not (source / "convert_hf_to_gguf.py").is_file():
        say(f"unpacking {archive.name} ...")
        with tarfile.open(archive) as tar:
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(source, members=[m for m in members if m.name], filter="data")
    say(f"building llama.cpp {version} (CPU + RPC; {', '.join(TARGETS)}); slow on few cores ...")
    build = home / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_RPC=ON",
            "-DGGML_NATIVE=ON",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
        ],
        check=True,
    )
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *TARGETS], check=True)
    return binaries


def source_of(binaries: Path) -> Path:
    return binaries.parents[1] / "src"


# -- the benchmark model ---------------------------------------------------------------------------
MODEL_SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 16000,
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
}
PYDEPS = CACHE / "pydeps"  # sentencepiece for the converter (bench only, never the product)


def python_deps() -> Path:
    if not (PYDEPS / "sentencepiece").is_dir():
        say("installing sentencepiece for the converter into the bench cache ...")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--target",
                str(PYDEPS),
                "sentencepiece",
            ],
            check=True,
        )
    return PYDEPS


def bench_model(work: Path) -> Path:
    """The random benchmark Llama (cached): llmpipe's safetensors + a SentencePiece
    tokenizer.model trained on the repo's docs, which the GGUF converter reads."""
    path = CACHE / "model-v1"
    if (path / "config.json").is_file() and (path / "tokenizer.model").is_file():
        return path
    sys.path.insert(0, str(ROOT / "stage_image"))
    from llmpipe_stage import demo

    partial = CACHE / "model-v1.partial"
    shutil.rmtree(partial, ignore_errors=True)
    say("writing the benchmark model (random Llama, ~213 M parameters) ...")
    demo.write_model(partial, family="llama", **MODEL_SHAPE)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))))
    trainer = (
        "import sentencepiece as spm, sys; spm.SentencePieceTrainer.train("
        "input=sys.argv[1], model_prefix=sys.argv[2], vocab_size=2000, "
        "model_type='bpe', byte_fallback=True, minloglevel=2)"
    )
    env = dict(os.environ, PYTHONPATH=str(python_deps()))
    subprocess.run(
        [sys.executable, "-c", trainer, str(corpus), str(partial / "tokenizer")],
        check=True,
        env=env,
    )
    (partial / "tokenizer.vocab").unlink(missing_ok=True)
    partial.rename(path)
    return path


GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}


def gguf_of(model: Path, binaries: Path, precision: str) -> Path:
    """The model converted by llama.cpp's own converter (cached next to the model)."""
    out = model.parent / f"{model.name}-{GGUF_TYPES[precision]}.gguf"
    if out.is_file():
        return out
    source = source_of(binaries)
    view = model.parent / f"{model.name}-convert"  # only what the converter should read
    view.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        if not (view / name).exists():
            (view / name).symlink_to(model / name)
    say(f"converting to GGUF {GGUF_TYPES[precision]} with convert_hf_to_gguf.py ...")
    env = dict(os.environ, PYTHONPATH=f"{source / 'gguf-py'}:{python_deps()}")
    partial = out.with_suffix(".partial")
    subprocess.run(
        [
            sys.executable,
            str(source / "convert_hf_to_gguf.py"),
            str(view),
            "--outtype",
            GGUF_TYPES[precision],
            "--outfile",
            str(partial),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    partial.rename(out)
    return out


# -- running the two systems --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_block(count: int) -> int:
    """A base port with base .. base+count-1 free (llmpipe serve uses consecutive ports)."""
    for base in range(21000, 31000, 89):
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with suppress(psutil.Error):
                total += proc.memory_info().rss
        return total
    except psutil.Error:
        return 0


@dataclass
class System:
    """One running system: its processes, its HTTP port, how it is asked to complete."""

    name: str
    port: int
    processes: list[subprocess.Popen[bytes]]
    llama: bool
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        def sample() -> None:
            while not self._stop.wait(0.25):
                rss = sum(tree_rss(p.pid) for p in self.processes)
                self.peak_rss = max(self.peak_rss, rss)

        threading.Thread(target=sample, daemon=True).start()

    def complete(self, prompt: list[int], new: int) -> int:
        if self.llama:
            url = f"http://127.0.0.1:{self.port}/completion"
            body = {
                "prompt": prompt,
                "n_predict": new,
                "temperature": 0,
                "top_k": 1,
                "ignore_eos": True,
                "cache_prompt": False,
            }
        else:
            url = f"http://127.0.0.1:{self.port}/v1/completions"
            body = {
                "model": "bench",
                "prompt": prompt,
                "max_tokens": new,
                "temperature": 0,
                "ignore_eos": True,
            }
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=1800) as response:
            reply = json.loads(response.read())
        if self.llama:
            return int(reply["tokens_predicted"])
        return int(reply["usage"]["completion_tokens"])

    def stop(self) -> None:
        self._stop.set()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_http(url: str, process: subprocess.Popen[bytes], *, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


LLMPIPE_ARGS: list[str] = []
"""Extra `llmpipe serve` flags for every llmpipe start (`--llmpipe-args`)."""


def start_llmpipe(model: Path, *, stages: int, precision: str, threads: int, log: Path) -> System:
    port = free_block(stages)
    grpc_port = free_block(stages + 40) + 20
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'operator'}:{ROOT / 'stage_image'}")
    dtype, quantization = ("bfloat16", "int8") if precision == "int8" else (precision, "none")
    command = [
        sys.executable, "-m", "llmpipe_cli", "serve", "--model", str(model),
        "--name", "bench", "--stages", str(stages), "--dtype", dtype,
        "--quantization", quantization, "--threads", str(threads),
        "--port", str(port), "--grpc-port", str(grpc_port), "--max-sequences", "4",
        "--max-context", "1024", "--run-dir", str(log.parent / f"run-{log.stem}"),
        # Decode against decode: llama-server does not speculate, and `serve`'s default
        # (`auto`: prompt-lookup drafts for greedy requests) would verify drafts of the
        # random model instead. `--llmpipe-args '--speculate auto'` measures that.
        "--speculate", "off",
        *LLMPIPE_ARGS,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    system = System("llmpipe", port, [process], llama=False)
    system.watch()  # from the start: the peak is often while loading
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", process)
    except BaseException:
        system.stop()
        raise
    return system


def start_llamacpp(
    binaries: Path, gguf: Path, *, rpc_servers: int, threads: int, log: Path
) -> System:
    processes: list[subprocess.Popen[bytes]] = []
    extra: list[str] = []
    if rpc_servers:
        endpoints = []
        for index in range(rpc_servers):
            rpc_port = free_port()
            processes.append(
                subprocess.Popen(
                    [
                        str(binaries / "ggml-rpc-server"),
                        "-H",
                        "127.0.0.1",
                        "-p",
                        str(rpc_port),
                        "-t",
                        str(threads),
                    ],
                    stdout=(log.parent / f"{log.stem}-rpc{index}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
            endpoints.append(f"127.0.0.1:{rpc_port}")
        time.sleep(2)
        split = ",".join(["1"] * rpc_servers)
        extra = ["--rpc", ",".join(endpoints), "-ngl", "999", "--tensor-split", split]
    port = free_port()
    server = subprocess.Popen(
        [
            str(binaries / "llama-server"),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(threads),
            "-np",
            "4",
            "-c",
            "4096",
            "--no-warmup",
            "--no-webui",
            *extra,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    processes.append(server)
    system = System("llama.cpp", port, processes, llama=True)
    system.watch()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server)
    except BaseException:
        system.stop()
        raise
    return system


@contextmanager
def both(
    model: Path, binaries: Path, *, mode: str, precision: str, work: Path
) -> Iterator[tuple[System, System]]:
    cores = os.cpu_count() or 1
    split = mode == "split"
    threads = max(1, cores // 2) if split else cores
    name = f"{mode}-{precision}"
    gguf = gguf_of(model, binaries, precision)
    ours = start_llmpipe(
        model, stages=2 if split else 1, precision=precision, threads=threads,
        log=work / f"llmpipe-{name}.log",
    )  # fmt: skip
    try:
        theirs = start_llamacpp(
            binaries, gguf, rpc_servers=2 if split else 0, threads=threads,
            log=work / f"llamacpp-{name}.log",
        )  # fmt: skip
        try:
            yield ours, theirs
        finally:
            theirs.stop()
    finally:
        ours.stop()


def prompt_ids(length: int, seed: int) -> list[int]:
    return [3 + (seed * 7919 + i * 104729) % 270 for i in range(length)]


def decode_rate(system: System, *, seqs: int, prompt: int, new: int) -> float:
    """Tokens per second with `seqs` requests in flight (prompt `prompt`, `new` tokens)."""
    prompts = [prompt_ids(prompt, seed) for seed in range(seqs)]
    with ThreadPoolExecutor(seqs) as pool:
        started = time.perf_counter()
        produced = sum(pool.map(lambda p: system.complete(p, new), prompts))
        took = time.perf_counter() - started
    return produced / took


def first_token_seconds(system: System, *, prompt: int, seed: int) -> float:
    started = time.perf_counter()
    system.complete(prompt_ids(prompt, seed), 1)
    return time.perf_counter() - started


@dataclass
class Figures:
    rates: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    ttft: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)


def measure(
    pair: tuple[System, System], *, seqs: list[int], rounds: int, prompt: int, new: int,
    ttft_prompt: int, figures: Figures,
) -> None:  # fmt: skip
    """Rounds alternate the two systems (A B, then B A), so both see the same load."""
    for system in pair:  # warm-up: first requests pay one-time costs
        system.complete(prompt_ids(8, 99), 4)
    for r in range(rounds):
        order = pair if r % 2 == 0 else pair[::-1]
        for n in seqs:
            for system in order:
                rate = decode_rate(system, seqs=n, prompt=prompt, new=new)
                figures.rates.setdefault((system.name, n), []).append(rate)
                say(f"  round {r + 1}: {system.name} {n} seq: {rate:.1f} tok/s")
        for system in order:
            took = first_token_seconds(system, prompt=ttft_prompt, seed=1000 + r)
            figures.ttft.setdefault(system.name, []).append(took)
            say(f"  round {r + 1}: {system.name} TTFT {ttft_prompt}: {took * 1000:.0f} ms")
    for system in pair:
        figures.rss[system.name] = system.peak_rss


def best(values: list[float]) -> float:
    return max(values)


def run_benchmark(args: argparse.Namespace, binaries: Path) -> int:
    work = Path(tempfile.mkdtemp(prefix="llmpipe-peer-"))
    model = bench_model(work)
    seqs = [int(s) for s in args.seqs.split(",")]
    print(
        f"# peer benchmark: llmpipe vs llama.cpp {binaries.parents[1].name} on "
        f"{os.cpu_count()} cores; random Llama hidden 1024, 16 layers, 16/4 heads, vocab "
        f"16000; prompt {args.prompt} tokens, {args.new} greedy tokens; TTFT at "
        f"{args.ttft_prompt} tokens; best of {args.rounds} alternating rounds; logs in {work}"
    )
    print(
        f"{'mode':<12} {'precision':<9} {'seqs':>4} {'llmpipe tok/s':>13} "
        f"{'llama.cpp tok/s':>15} {'ratio':>6}"
    )
    results: dict[tuple[str, str], Figures] = {}
    configs = (
        [tuple(c.split(":")) for c in args.configs.split(",")]
        if args.configs
        else [
            (mode, precision)
            for precision in args.precisions.split(",")
            for mode in args.modes.split(",")
        ]
    )
    for mode, precision in configs:
        figures = Figures()
        say(f"{mode} {precision}: starting both systems ...")
        with both(model, binaries, mode=mode, precision=precision, work=work) as pair:
            measure(
                pair, seqs=seqs, rounds=args.rounds, prompt=args.prompt, new=args.new,
                ttft_prompt=args.ttft_prompt, figures=figures,
            )  # fmt: skip
        results[(mode, precision)] = figures
        for n in seqs:
            ours = best(figures.rates[("llmpipe", n)])
            theirs = best(figures.rates[("llama.cpp", n)])
            print(
                f"{mode:<12} {precision:<9} {n:>4} {ours:>13.1f} {theirs:>15.1f} "
                f"{ours / theirs:>6.2f}",
                flush=True,
            )
        say(
            f"{mode} {precision}: TTFT llmpipe {min(figures.ttft['llmpipe']) * 1000:.0f} ms, "
            f"llama.cpp {min(figures.ttft['llama.cpp']) * 1000:.0f} ms; peak RSS llmpipe "
            f"{figures.rss['llmpipe'] / 2**20:.0f} MB, llama.cpp "
            f"{figures.rss['llama.cpp'] / 2**20:.0f} MB"
        )
    print(f"\n{'mode':<12} {'precision':<9} {'TTFT llmpipe':>12} {'llama.cpp':>10} "
          f"{'ratio':>6} {'peak RSS llmpipe':>16} {'llama.cpp':>10}")  # fmt: skip
    for (mode, precision), figures in results.items():
        ours_t = min(figures.ttft["llmpipe"])
        theirs_t = min(figures.ttft["llama.cpp"])
        print(
            f"{mode:<12} {precision:<9} {ours_t * 1000:>10.0f}ms {theirs_t * 1000:>8.0f}ms "
            f"{theirs_t / ours_t:>6.2f} {figures.rss['llmpipe'] / 2**20:>14.0f}MB "
            f"{figures.rss['llama.cpp'] / 2**20:>8.0f}MB"
        )
    print("(TTFT ratio = llama.cpp / llmpipe: above 1 means llmpipe is first)")
    losses = []
    for precision in dict.fromkeys(p for _, p in configs):
        if ("one-process", precision) in results and ("split", precision) in results:
            for n in seqs:
                loss = {
                    name: 1
                    - best(results[("split", precision)].rates[(name, n)])
                    / best(results[("one-process", precision)].rates[(name, n)])
                    for name in ("llmpipe", "llama.cpp")
                }
                losses.append(
                    f"{precision} {n}seq: llmpipe {loss['llmpipe']:+.0%}, "
                    f"llama.cpp {loss['llama.cpp']:+.0%}"
                )
    if losses:
        print("throughput lost to the split (1 - split / one process): " + "; ".join(losses))

    def ratio(mode: str, n: int) -> str:
        figures = results.get((mode, "bfloat16"))
        if figures is None or ("llmpipe", n) not in figures.rates:
            return "n/a"
        ours = best(figures.rates[("llmpipe", n)])
        return f"{ours / best(figures.rates[('llama.cpp', n)]):.2f}"

    print(
        f"peer: bf16 one-process 1seq={ratio('one-process', 1)} 4seq={ratio('one-process', 4)}; "
        f"split 1seq={ratio('split', 1)} 4seq={ratio('split', 4)}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build-only", action="store_true", help="build llama.cpp and stop")
    parser.add_argument("--precisions", default="bfloat16,float32,int8")
    parser.add_argument("--modes", default="one-process,split")
    parser.add_argument(
        "--configs",
        default="",
        help="mode:precision pairs instead of every mode x precision, e.g. "
        "one-process:bfloat16,split:bfloat16",
    )
    parser.add_argument("--seqs", default="1,4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (decode runs)")
    parser.add_argument("--new", type=int, default=64, help="greedy tokens per sequence")
    parser.add_argument("--ttft-prompt", type=int, default=512)
    parser.add_argument(
        "--llmpipe-args",
        default="",
        help="extra `llmpipe serve` flags, e.g. '--micro-batches 1' (split into words)",
    )
    args = parser.parse_args()
    LLMPIPE_ARGS[:] = args.llmpipe_args.split()
    binaries = build_llamacpp()
    say(f"llama.cpp binaries in {binaries}")
    if args.build_only:
        return 0
    return run_benchmark(args, binaries)


if __name__ == "__main__":
    sys.exit(main())
