"""The transport-agnostic service: owners and keys, client sessions, request numbering and dedupe,
futures, checkpoint paths and lifecycle, validation in one place. The gRPC servicer and the
Tinker-compatible HTTP API are thin adaptors over `core.service.Service`."""
