"""The front ends: REST (`service.api.rest.create_app`) and gRPC (`service.api.grpc`).

Importing this package imports neither, so each front end loads only what it needs.
"""
