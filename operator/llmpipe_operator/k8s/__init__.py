"""k8s: the only code that talks to the Kubernetes API server (lightkube, async)."""
