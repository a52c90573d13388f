"""The HTTP side of a stage: health, readiness, metrics, and stage 0's OpenAI API.

`app` runs the aiohttp server (`start_http`, `attach`), `openai_api` the OpenAI routes,
`protocol` the two narrow protocols the stage process hands in (`Status`, `Generations`),
`replies` OpenAI's error shape. Request parsing (`llmpipe_stage.api_requests`) and
response bodies (`llmpipe_stage.api_responses`) are pure modules of their own. This
package imports no server, handler, backend, coordinator or runtime code, and no torch.
"""

from llmpipe_stage.gateway.app import HttpSettings, attach, dual_stack_socket, start_http
from llmpipe_stage.gateway.protocol import Generations, Progress, Serving, Status

__all__ = [
    "Generations",
    "HttpSettings",
    "Progress",
    "Serving",
    "Status",
    "attach",
    "dual_stack_socket",
    "start_http",
]
