"""What the operator and the stages agree on, and nothing else: pure code both import.

`pki` issues and checks the stages' certificates (the operator issues them, a stage reads
the identity in its own and its callers' certificates). This package imports no llmpipe
package and does no I/O: no kopf, no API client, no gRPC, no torch (import-linter
contract in pyproject.toml).
"""
