"""llmpipe stage runtime: one slice of a model's layers, served over gRPC.

Split like Petals': server (RPC), runtime (layers slice + KV cache), loading (only this
stage's weights), wire (tensor <-> bytes); stage 0 also serves the OpenAI-compatible API.
"""

__version__ = "0.1.0.dev0"
