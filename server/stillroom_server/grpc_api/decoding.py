"""Requests whose bytes are not a valid protobuf message of their method's type: answered with
INVALID_ARGUMENT naming the message, instead of the UNKNOWN (and the logged traceback) gRPC gives when
a method's deserializer raises before the servicer is called (found by the wire fuzzer, issue 25)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class _Undecodable:
    """What the deserializer hands on for bytes it could not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, or anything else the parser raises
            return _Undecodable(error)

    return parse


def _refusal(method: str) -> str:
    return f"request: not a valid protobuf message for {method.rsplit('/', 1)[-1]} (the bytes do not parse)"


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Wraps every unary-request method's handler: a request that does not parse is refused."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        deserializer = _lenient(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(method))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(method))
                async for message in inner_stream(request, context):  # pyright: ignore[reportGeneralTypeIssues]
                    yield message

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        return handler
