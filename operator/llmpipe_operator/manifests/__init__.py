"""Manifests: pure builders from (spec, plan) to Kubernetes objects as plain dicts.

No API calls and no I/O; `k8s` applies what these return.
"""
