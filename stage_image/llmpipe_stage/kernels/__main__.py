"""`python -m llmpipe_stage.kernels [--build DIR]`: say which decode product path runs here,
or (`--build`) compile the kernel into DIR ahead of time, as the stage image does so that a
pod needs no compiler. On a CPU architecture the kernel is not written for (anything but
x86-64) `--build` says so and succeeds: the stage then runs torch's products."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from llmpipe_stage import kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmpipe_stage.kernels")
    parser.add_argument("--build", type=Path, help="compile the kernel into this folder")
    args = parser.parse_args(argv)
    if args.build is None:
        print(kernels.status())
        return 0 if kernels.available() else 1
    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"decode kernel: not built on {platform.machine()} (x86-64 only); torch products")
        return 0
    args.build.mkdir(parents=True, exist_ok=True)
    print(f"decode kernel: built {kernels.build(args.build)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
