"""The gRPC edge: protobuf <-> engine types, the one place errors become status codes, futures."""
