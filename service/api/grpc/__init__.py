"""The gRPC front end: `ldm.v1.Diffusion` (proto/ldm/v1/ldm.proto) over the job queue, on grpc.aio.

One module per part, each doing one thing:
- `convert.py`: proto messages <-> the shared schemas, pure;
- `servicer.py`: `DiffusionServicer` submits jobs, follows their events, answers with their PNGs; it raises
  exceptions as they come and never picks a status code (its docstring: how calls and jobs share deadlines);
- `status.py`: `status_of`, the one place exceptions become status codes;
- `guard.py`: `CallGuard`, the API key (from the metadata, before the message is read) and the key's rate;
- `interceptor.py`: `StatusInterceptor`, which runs the guard and answers every method's exceptions with
  `status_of`, for every method of the service;
- `server.py`: the server beside the health service and reflection, started and stopped gracefully;
- `errors.py` and `stubs.py`: the servicer's own exceptions; the generated messages.

What the rest of the service uses is exported here.
"""

from service.api.grpc.server import bound_port, create_grpc_server, reflection_enabled, serve_grpc, stop_grpc
from service.api.grpc.servicer import JOB_ID_METADATA
from service.api.grpc.stubs import SERVICE_NAME

__all__ = ["JOB_ID_METADATA", "SERVICE_NAME", "bound_port", "create_grpc_server", "reflection_enabled", "serve_grpc",
           "stop_grpc"]
