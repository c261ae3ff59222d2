"""The generated ldm.v1 messages (`pb`) and service stubs (`pb_grpc`) of proto/ldm/v1/ldm.proto.

They are a build output (`python -m service.api.proto_build`, run by `make install`); a checkout without them
fails here with a message that names that step, not with a bare ModuleNotFoundError deep in an import.
"""

from __future__ import annotations

try:
    from service.api._proto.ldm.v1 import ldm_pb2 as pb
    from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc
except ModuleNotFoundError as exc:  # pragma: no cover - a checkout where nobody built the stubs
    if not (exc.name or "").startswith("service.api._proto"):
        raise
    raise ModuleNotFoundError("the gRPC stubs are not generated: run `python -m service.api.proto_build` "
                              "(`make install` does)", name=exc.name) from exc

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Diffusion"].full_name  # "ldm.v1.Diffusion"
