"""The `llmpipe` command line: `profile`, `plan` (pure planning) and `serve` (local pipeline).

`serve` (`llmpipe_cli.launcher`) needs the stage runtime's packages and is imported only
when asked for, so `llmpipe plan` (`llmpipe_cli.plan`) works in the operator image, which
has no torch.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        from llmpipe_cli import launcher

        return launcher.main(args[1:])
    from llmpipe_cli import plan

    return plan.main(args)


if __name__ == "__main__":
    sys.exit(main())
