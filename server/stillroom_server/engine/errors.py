"""The engine's error types: each names what was wrong; the service maps them to status codes."""


class EngineError(Exception):
    """Base of the errors the engine raises on purpose."""


class InvalidInput(EngineError, ValueError):
    """A request's field is malformed or out of range; the message names the field and the limit."""


class NotFound(EngineError, LookupError):
    """A model, run, sampler or checkpoint that does not exist."""


class AlreadyExists(EngineError):
    """A name that is already taken (checkpoint names are never overwritten)."""


class FailedPrecondition(EngineError):
    """The request is well formed but the target is in the wrong state for it."""


class EngineUnavailable(EngineError):
    """The engine holding the request's model is down (its process died, or it has not connected):
    the service is not at fault of the caller; the message names the engine and the cause."""
