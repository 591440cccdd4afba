"""Stillroom's own gRPC wire: protobuf <-> core calls, and core error codes -> gRPC status codes."""
