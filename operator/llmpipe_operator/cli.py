"""The `llmpipe` command line: `profile`, `plan` (pure planning) and `serve` (local pipeline).

`serve` lives in the stage runtime package and is imported only when asked for, so
`llmpipe plan` works in the operator image, which has no torch.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        from llmpipe_stage import launcher

        return launcher.main(args[1:])
    from llmpipe_operator import plan_cli

    return plan_cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
