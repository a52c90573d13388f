"""The `llmpipe` command line, above both runtimes: `profile` and `plan` (the pure planner
on files, `plan`, `modelfiles`) and `serve` (a whole pipeline on this machine, `launcher`).

`main` dispatches; `serve` imports the stage runtime only when asked for, so `llmpipe
plan` works in the operator image, which has no torch. Neither `llmpipe_operator` nor
`llmpipe_stage` imports this package (import-linter contract in pyproject.toml).
"""
