"""llmpipe operator: plans an LLM pipeline over edge and cloud nodes and keeps it running.

Layers (enforced by import-linter, see pyproject.toml):
main > reconcile > (k8s | manifests | status) > planning.
"""

__version__ = "0.1.0.dev0"
