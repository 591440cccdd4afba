"""A fuzzer of both wires of a real `stillroom serve`: requests generated with hypothesis from the
wires' own schemas (the Tinker SDK's pydantic request models and the server's, the Tinker
ForwardBackwardRequest protobuf, and every method of stillroom.v1.Stillroom from its message
descriptors), most fields valid and some hostile (wrong JSON types, NaN and infinities, huge and
fractional integers, deep nesting, huge strings, bad tensors, truncated protobuf).

Two owners: A sends every fuzzed request, B owns a run, checkpoints, sessions, a sampler and
futures that A's requests name among A's own. What must hold for every request:
  - HTTP: no 5xx and no dropped connection; gRPC: no INTERNAL, UNKNOWN or UNAVAILABLE;
  - a request accepted as a future does not fail as a server error;
  - no answer shows the server's data dir, a traceback, or anything of B's that A did not name;
and at the end (`Fuzzer.final_problems`): the server process alive, /api/v1/healthz and the gRPC
health check fine, and B's weights, checkpoints and sequence numbers as they were.

Used by tests/test_fuzz_wires.py (a bounded run) and scripts/fuzz_wires.py (a longer one).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from hypothesis import strategies as st

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.http_api._proto import tinker_wire_pb2 as tw

TINY = "stillroom/char-1m"
MARK_B = "owner-b-private-5f1e"  # in B's metadata and tags: never in an answer to A
SEQ = 2**62 + 424_242  # placeholder: the sender writes the run's next seq here
DEEP = "@@deep-nesting@@"  # placeholder: the sender writes 100 000 nested brackets here
DEEP_DEPTH = 100_000
BAD_GRPC = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}
LOSSES = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "teacher_reverse_kl"]
FB_KEYS = ["target_tokens", "weights", "advantages", "logprobs", "mystery"]
CONFIG_KEYS = ["beta", "clip_low_threshold", "clip_high_threshold", "topk", "teacher", "x"]


# ---------------------------------------------------------------- the server


class FuzzServer:
    """`stillroom serve` in a child process on a fresh data dir, with a key for each owner."""

    def __init__(self, data_dir: Path) -> None:
        from stillroom_server.store import Store, keys

        self.data_dir = data_dir
        store = Store(f"sqlite:///{data_dir / 'stillroom.db'}")
        store.upgrade()
        self.key_a = keys.create_key(store, "fuzz-owner-a", "fuzzer")[1]
        self.key_b = keys.create_key(store, "fuzz-owner-b", "bystander")[1]
        store.close()
        ready = data_dir / "ready"
        self.log_path = data_dir / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stillroom.cli",
                "serve",
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
                "--ready-file",
                str(ready),
                "--log-level",
                "WARNING",
                "--threads",
                "1",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"stillroom serve did not start: {self.log_tail()}")
            time.sleep(0.05)
        self.grpc_address, self.http_url = ready.read_text().splitlines()[:2]

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()


# ---------------------------------------------------------------- small wire helpers


def int32_bytes(values) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def tw_dense(values, dtype: int, shape=None) -> tw.Tensor:
    numpy_dtypes: dict[int, str] = {tw.DTYPE_INT64: "<i8", tw.DTYPE_FLOAT32: "<f4", tw.DTYPE_INT32: "<i4"}
    numpy_dtype = numpy_dtypes[dtype]
    array = np.asarray(values, dtype=numpy_dtype)
    return tw.Tensor(
        dense=array.tobytes(),
        dtype=dtype,  # pyright: ignore[reportArgumentType]
        shape=list(array.shape) if shape is None else shape,
    )


def tw_datum(tokens, targets=None, weights=None) -> tw.Datum:
    targets = list(tokens[1:]) + [2] if targets is None else targets
    weights = [1.0] * len(tokens) if weights is None else weights
    return tw.Datum(
        model_input=[tw.Chunk(encoded_text=tw.EncodedTextChunk(tokens=int32_bytes(tokens)))],
        loss_fn_inputs={
            "target_tokens": tw_dense(targets, tw.DTYPE_INT64),
            "weights": tw_dense(weights, tw.DTYPE_FLOAT32),
        },
    )


def pb_tensor(values, dtype: int) -> pb.Tensor:
    array = np.asarray(values, dtype="<i8" if dtype == pb.INT64 else "<f4")
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())  # pyright: ignore[reportArgumentType]


def pb_prompt(tokens) -> pb.ModelInput:
    return pb.ModelInput(
        chunks=[
            pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=pb_tensor(list(tokens), pb.INT64)))
        ]
    )


def json_text(body: Any) -> bytes:
    """JSON as Python writes it (NaN and Infinity included), with DEEP placeholders filled in."""
    text = json.dumps(body, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * DEEP_DEPTH + "]" * DEEP_DEPTH).encode(
        "utf-8", errors="surrogatepass"
    )


def walk_replace(value: Any, old: Any, new: Any) -> Any:
    if isinstance(value, dict):
        return {k: walk_replace(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [walk_replace(v, old, new) for v in value]
    if type(value) is type(old) and value == old:
        return new
    return value


# ---------------------------------------------------------------- the world both owners live in


@dataclasses.dataclass
class World:
    """Ids of what each owner made at the start; A's fuzzed requests name both owners' ids."""

    a_session: str = ""
    a_spare_session: str = ""
    a_run: str = ""  # HTTP-made (session:train:0)
    a_spare_run: str = ""  # may be unloaded / closed by the fuzzer
    a_grpc_run: str = ""
    a_sampler: str = ""  # HTTP sampling session on the base model
    a_grpc_sampler: str = ""
    a_paths: list[str] = dataclasses.field(default_factory=list)  # A's checkpoints
    a_spare_paths: list[str] = dataclasses.field(default_factory=list)  # may be deleted
    a_futures: list[str] = dataclasses.field(default_factory=list)
    b_session: str = ""
    b_run: str = ""
    b_grpc_run: str = ""
    b_sampler: str = ""
    b_grpc_sampler: str = ""
    b_paths: list[str] = dataclasses.field(default_factory=list)
    b_futures: list[str] = dataclasses.field(default_factory=list)

    def b_ids(self) -> list[str]:
        ids = [
            self.b_session,
            self.b_run,
            self.b_grpc_run,
            self.b_sampler,
            self.b_grpc_sampler,
            *self.b_paths,
            *self.b_futures,
        ]
        return [i for i in ids if i]

    def runs(self) -> list[str]:
        return [self.a_run, self.a_grpc_run, self.b_run, self.b_grpc_run]


def stillroom_path(path: str) -> str:
    return "stillroom://" + path.split("://", 1)[1] if "://" in path else path


def tinker_path(path: str) -> str:
    return "tinker://" + path.split("://", 1)[1] if "://" in path else path


# ---------------------------------------------------------------- hostile values

HUGE_INTS = [
    -1,
    0,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**30,
    -(10**30),
]
# Optional in the SDK's request models, yet sent by the SDK every time (or the server needs them).
SENT_ALWAYS = {
    "seq_id",
    "sampling_session_id",
    "model_id",
    "session_id",
    "adam_params",
    "num_samples",
    "max_tokens",
}
INT64S = [v for v in HUGE_INTS if -(2**63) <= v < 2**63]
BAD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324]
JSON_WRONG_TYPES = ["1", "", None, True, False, [], {}, [1, 2], {"a": 1}, DEEP]


def garbage_strings(json_wire: bool) -> st.SearchStrategy[str]:
    fixed = [
        "",
        "x" * 300,
        "x" * 200_000,
        "\x00",
        "../../../etc/passwd",
        "stillroom://../../x",
        "tinker://../../x",
        "stillroom://run-nope/sampler_weights/x",
        "tinker://a/b/c/d",
        "%2e%2e%2f",
        "run-" + "f" * 32,
        "\u202e\U0001f642",
        " ",
        "null",
        "samp-nope",
        "req-nope",
    ]
    if json_wire:
        fixed.append("\ud800")  # a lone surrogate: valid JSON, not valid UTF-8
    return st.sampled_from(fixed) | st.text(max_size=12)


def hostile_json(kind: str) -> st.SearchStrategy[Any]:
    """A value for a JSON field of `kind` that the field's schema does not allow (or only just)."""
    floats = st.sampled_from(BAD_FLOATS)
    ints = st.sampled_from(HUGE_INTS + [1.5, -0.5, 1e30])
    wrong = st.sampled_from(JSON_WRONG_TYPES)
    big_list = st.sampled_from([[1] * 200_000, [[[[1]]]], [None], ["x"] * 1000])
    return {
        "integer": ints | floats | wrong,
        "number": floats | ints | wrong,
        "string": garbage_strings(True) | wrong | floats,
        "boolean": wrong | ints,
        "array": wrong | big_list | floats,
        "object": wrong | st.just({"x" * 1000: 1}) | floats,
    }.get(kind, wrong | floats | ints)


def chance(draw, one_in: int) -> bool:
    """True about one time in `one_in` (2, or 4 and more), inside a composite strategy."""
    return draw(st.integers(0, 2**16)) % one_in == one_in // 2


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy, hostile_in: int = 8):
    """`valid`, or one time in `hostile_in` `hostile`."""
    # (integers(0, n - 1) == 0 would come up about twice as often: hypothesis favours the bounds)
    return st.integers(0, 2**16).flatmap(lambda k: hostile if k % hostile_in == hostile_in // 2 else valid)


# ---------------------------------------------------------------- HTTP requests from schemas


@dataclasses.dataclass
class HttpCase:
    method: str
    path: str
    body: Any = None  # JSON body (None: no body)
    raw: bytes | None = None  # a raw body instead (protobuf or garbage)
    params: dict | None = None
    headers: dict = dataclasses.field(default_factory=dict)
    key: str = "a"  # "a", "none" or "wrong"
    route: str = ""  # the route's template, for the counts

    def describe(self) -> str:
        if self.raw is not None:
            body = f"raw {len(self.raw)} bytes {self.raw[:300]!r}"
        else:
            text = json_text(self.body).decode("utf-8", errors="replace") if self.body is not None else ""
            body = (text[:400] + f"... ({len(text)} chars)") if len(text) > 400 else text
        return (
            f"{self.method} {self.path} params={self.params} headers={self.headers} key={self.key} "
            f"body={body}"
        )


class Generators:
    """Hypothesis strategies for both wires, over the ids of `world`."""

    def __init__(self, world: World) -> None:
        self.world = world
        w = world
        self.runs_a = [w.a_run, w.a_grpc_run]
        self.runs_any = [w.a_run, w.a_grpc_run, w.a_spare_run, w.b_run, w.b_grpc_run]
        self.samplers = [w.a_sampler, w.a_grpc_sampler, w.b_sampler, w.b_grpc_sampler]
        self.sessions = [w.a_session, w.a_spare_session, w.b_session]
        self.paths = sorted(
            {f(p) for p in w.a_paths + w.a_spare_paths + w.b_paths for f in (stillroom_path, tinker_path)}
        )
        self.futures = w.a_futures + w.b_futures

    # ids -------------------------------------------------------------

    def pick(self, values: list[str], json_wire: bool, favour: str | None = None):
        choice = st.sampled_from([v for v in values if v])
        if favour:
            choice = mostly(st.just(favour), choice, 3)  # the caller's own id two times in three
        return mostly(choice, garbage_strings(json_wire), 8)

    def string_for(self, name: str, json_wire: bool) -> st.SearchStrategy[str] | None:
        w = self.world
        if name in ("model_id", "training_run_id", "run_id"):
            return self.pick(self.runs_any, json_wire, w.a_run if json_wire else w.a_grpc_run)
        if name in ("sampling_session_id", "sampler_id"):
            return self.pick(self.samplers, json_wire, w.a_sampler if json_wire else w.a_grpc_sampler)
        if name == "session_id":
            return self.pick(self.sessions, json_wire, w.a_session)
        if name == "request_id":
            return self.pick(self.futures, json_wire)
        if name in ("model_path", "tinker_path", "source_path") or (name == "path" and not json_wire):
            return self.pick(self.paths, json_wire)
        if name == "path":  # Tinker's save name, or a checkpoint path to load
            return mostly(
                st.sampled_from(["fz-a", "fz-b"]) | st.from_regex(r"fz-[a-z0-9]{1,6}", fullmatch=True),
                self.pick(self.paths, json_wire) | garbage_strings(json_wire),
                3,
            )
        if name == "name":
            return mostly(st.from_regex(r"fz-[a-z0-9]{1,6}", fullmatch=True), garbage_strings(json_wire), 4)
        if name == "model":  # the OpenAI API's: a base model or a sampler checkpoint
            return mostly(
                st.just(TINY) | st.sampled_from([p for p in self.paths if "sampler_weights" in p]),
                garbage_strings(json_wire),
                5,
            )
        if name in ("base_model", "teacher"):
            return mostly(st.just(TINY), self.pick(self.paths, json_wire) | garbage_strings(json_wire), 4)
        if name == "loss_fn":
            return mostly(st.sampled_from(LOSSES), garbage_strings(json_wire), 5)
        if name == "kind":
            return mostly(
                st.sampled_from(["snapshot", "inflight", "weights", "sampler_weights"]),
                garbage_strings(json_wire),
                4,
            )
        if name == "type":
            return st.sampled_from(["adamw", "adam", "dimuon", "success", "errored"])  # a non-const `type`
        return None

    def int_for(self, name: str) -> st.SearchStrategy[int] | None:
        small = {
            "num_samples": (1, 3),
            "max_tokens": (1, 6),
            "top_k": (-1, 40),
            "rank": (1, 8),
            "topk_prompt_logprobs": (0, 3),
            "topk_sample_logprobs": (0, 3),
            "prompt_logprobs_last_n": (0, 6),
            "limit": (0, 30),
            "offset": (0, 5),
            "model_seq_id": (0, 40),
            "sampling_session_seq_id": (0, 5),
            "ttl_seconds": (60, 10**6),
            "part": (0, 2),
            "num_parts": (0, 2),
            "prompt_alt_tokens_k": (0, 0),
            "n": (1, 2),
            "max_completion_tokens": (1, 6),
            "top_logprobs": (0, 3),
            "best_of": (1, 2),
        }
        if name in ("seq_id", "seq"):
            return st.sampled_from([SEQ] * 6 + [0, -1, 1, 2**31 - 1])
        if name == "seed":
            return st.integers(-(2**63), 2**63 - 1)
        if name in small:
            low, high = small[name]
            return st.integers(low, high)
        return None

    def float_for(self, name: str) -> st.SearchStrategy[float] | None:
        ranges = {
            "learning_rate": (1e-5, 1e-2),
            "beta1": (0.0, 0.99),
            "beta2": (0.0, 0.999),
            "eps": (1e-12, 1e-6),
            "weight_decay": (0.0, 0.1),
            "grad_clip_norm": (0.0, 2.0),
            "temperature": (0.0, 2.0),
            "top_p": (0.01, 1.0),
            "timeout_seconds": (0.0, 1.0),
            "beta": (0.0, 2.0),
            "clip_low_threshold": (0.5, 1.0),
            "clip_high_threshold": (1.0, 2.0),
            "topk": (0.0, 4.0),
        }
        if name in ranges:
            low, high = ranges[name]
            return st.floats(low, high)
        return None

    # JSON from a JSON schema ---------------------------------------------------

    def json_value(self, schema: dict, defs: dict, name: str = "", depth: int = 0) -> st.SearchStrategy:
        return mostly(self._json_valid(schema, defs, name, depth), hostile_json(self._kind(schema, defs)), 20)

    def _kind(self, schema: dict, defs: dict) -> str:
        if "$ref" in schema:
            return self._kind(defs[schema["$ref"].split("/")[-1]], defs)
        if "anyOf" in schema:
            kinds = [self._kind(s, defs) for s in schema["anyOf"] if s.get("type") != "null"]
            return kinds[0] if kinds else "null"
        return schema.get("type", "any")

    def _json_valid(self, schema: dict, defs: dict, name: str, depth: int) -> st.SearchStrategy:
        if "$ref" in schema:
            target = defs[schema["$ref"].split("/")[-1]]
            return st.deferred(lambda: self._json_valid(target, defs, name, depth + 1))
        if "anyOf" in schema:
            options = [s for s in schema["anyOf"] if s.get("type") != "null"]
            nullable = len(options) < len(schema["anyOf"])
            strategies = [self._json_valid(s, defs, name, depth) for s in options]
            choice = st.one_of(strategies[:1] * 3 + strategies[1:])  # the first is the usual shape
            return (choice | st.none()) if nullable and name not in SENT_ALWAYS else choice
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        if kind == "string":
            named = self.string_for(name, True)
            if named is not None:
                return named
            if schema.get("format") == "binary":
                return st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode())
            return st.text(max_size=10)
        if kind == "integer":
            named = self.int_for(name)
            return named if named is not None else st.integers(-3, 50)
        if kind == "number":
            named = self.float_for(name)
            return named if named is not None else st.floats(-5.0, 5.0)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            if name == "tokens":
                token = mostly(
                    st.integers(0, 100), st.sampled_from(HUGE_INTS + BAD_FLOATS + [1.5, "5", None]), 10
                )
                return st.lists(token, min_size=1, max_size=8)
            items = schema.get("items", {})
            return st.lists(
                self.json_value(items, defs, name, depth + 1),
                min_size=1 if name in ("chunks", "messages") else 0,
                max_size=3 if depth < 4 else 1,
            )
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties", {})
            if not properties:  # a free-form map (user_metadata, telemetry's event_data)
                extra = schema.get("additionalProperties")
                values = (
                    self.json_value(extra, defs, "", depth + 1)
                    if isinstance(extra, dict) and extra
                    else st.text(max_size=6) | st.integers()
                )
                return st.dictionaries(
                    mostly(st.text(max_size=6), garbage_strings(True), 8),
                    mostly(values, garbage_strings(True), 8),
                    max_size=3,
                )
            required = set(schema.get("required", [])) | (SENT_ALWAYS & set(properties))
            fields = {
                k: self.json_value(v, defs, k, depth + 1) for k, v in properties.items() if k in required
            }
            optional = {
                k: self.json_value(v, defs, k, depth + 1) for k, v in properties.items() if k not in required
            }
            return st.fixed_dictionaries(fields, optional=optional).map(
                lambda d: {k: v for k, v in d.items() if v is not None or k in required}
            )
        return st.one_of(st.none(), st.integers(), st.text(max_size=5))

    def json_body(self, *models) -> st.SearchStrategy[Any]:
        """A body for a route whose shape is any of `models` (pydantic classes), hostile at times as a
        whole: not an object, a required key dropped, an unknown key added, or nested deep."""
        bodies = []
        for model in models:
            schema = model.model_json_schema()
            bodies.append(self._json_valid(schema, schema.get("$defs", {}), "", 0))
        body = st.one_of(bodies)

        def mutate(pair):
            value, how = pair
            if how == 0 or not isinstance(value, dict):
                return value
            if how == 1 and value:
                return dict(list(value.items())[1:])
            if how == 2:
                return {**value, "unexpected_field": [1, {"a": None}]}
            if how == 3:
                return {**value, "nested": DEEP}
            return value

        whole = st.sampled_from(JSON_WRONG_TYPES + [[{}], 3, math.nan])
        return mostly(st.tuples(body, st.sampled_from([0] * 12 + [1, 2, 3])).map(mutate), whole, 15)

    # the routes -------------------------------------------------------------

    def http_cases(self) -> st.SearchStrategy[HttpCase]:
        import tinker.types as T

        from stillroom_server.http_api import schemas as S

        w = self.world
        session_path = self.pick([w.a_spare_session, w.b_session], True)  # never A's own session
        run_path = self.pick(self.runs_any, True, w.a_run)
        ckpt_name = st.sampled_from(["weights", "sampler_weights", "x", "..", ""]).flatmap(
            lambda kind: st.sampled_from(["fz-a", "a-ckpt", "b-ckpt", "..", "%2e%2e", "x" * 600]).map(
                lambda name: (kind, name)
            )
        )

        def post(path, *models):
            return self.json_body(*models).map(lambda body: HttpCase("POST", path, body))

        def query(path):
            def window(pair):
                limit, offset = pair
                params = {k: v for k, v in (("limit", limit), ("offset", offset)) if v is not None}
                return HttpCase("GET", path, params=params)

            value = (
                st.none()
                | st.integers(0, 30).map(str)
                | st.sampled_from(
                    ["-1", "1e30", str(10**30), str(2**63), "1.5", "NaN", "inf", "abc", "", "0x10", " 5"]
                )
            )
            return st.tuples(value, value).map(window)

        def url(template: str, strategy):
            return strategy.map(lambda value: template.format(quote(value)))

        def checkpoint_url(suffix: str, method: str, body=None):
            return st.tuples(run_path, ckpt_name, body if body is not None else st.none()).map(
                lambda t: HttpCase(
                    method,
                    f"/api/v1/training_runs/{quote(t[0])}/checkpoints/"
                    f"{quote(t[1][0])}/{quote(t[1][1])}{suffix}",
                    t[2],
                )
            )

        routes = [
            post("/api/v1/client/config", T.ClientConfigRequest),
            post("/api/v1/client/dynamic_config", T.ClientConfigRequest),
            post("/api/v1/create_session", T.CreateSessionRequest, S.CreateSession),
            post("/api/v1/session_heartbeat", T.SessionHeartbeatRequest),
            st.tuples(session_path, self.json_body(S.FinishSession)).map(
                lambda t: HttpCase("POST", f"/api/v1/sessions/{quote(t[0])}/finish", t[1])
            ),
            post("/api/v1/telemetry", T.TelemetrySendRequest),
            st.just(HttpCase("GET", "/api/v1/get_server_capabilities")),
            post("/api/v1/create_model", T.CreateModelRequest, S.CreateModel),
            post("/api/v1/get_info", T.GetInfoRequest),
            self.json_body(T.UnloadModelRequest).map(
                lambda body: HttpCase("POST", "/api/v1/unload_model", _unload_target(body, w))
            ),
            self.forward_backward_http("/api/v1/forward_backward"),
            self.forward_backward_http("/api/v1/forward_backward"),
            self.forward_backward_http("/api/v1/forward_backward"),
            self.forward_backward_http("/api/v1/forward"),
            post("/api/v1/optim_step", T.OptimStepRequest, S.OptimStep).map(_adam_params),
            post("/api/v1/optim_step", T.OptimStepRequest, S.OptimStep).map(_adam_params),
            post("/api/v1/save_weights", T.SaveWeightsRequest, S.SaveWeights),
            post("/api/v1/save_weights_for_sampler", T.SaveWeightsForSamplerRequest, S.SaveWeightsForSampler),
            post("/api/v1/load_weights", T.LoadWeightsRequest, S.LoadWeights),
            post("/api/v1/create_sampling_session", T.CreateSamplingSessionRequest, S.CreateSamplingSession),
            url("/api/v1/samplers/{}", self.pick(self.samplers, True)).map(lambda p: HttpCase("GET", p)),
            post("/api/v1/asample", T.SampleRequest),
            post("/api/v1/asample", T.SampleRequest),
            post("/api/v1/asample", T.SampleRequest),
            post("/api/v1/retrieve_future", T.FutureRetrieveRequest, S.RetrieveFuture),
            query("/api/v1/training_runs"),
            url("/api/v1/training_runs/{}", run_path).map(lambda p: HttpCase("GET", p)),
            url("/api/v1/training_runs/{}/checkpoints", run_path).map(lambda p: HttpCase("GET", p)),
            query("/api/v1/checkpoints"),
            checkpoint_url("", "DELETE").map(lambda c: _spare_only(c, w)),
            checkpoint_url("/ttl", "PUT", self.json_body(S.SetTtl)).map(lambda c: _spare_only(c, w)),
            checkpoint_url("/publish", "POST"),
            checkpoint_url("/external_weights_urls", "GET"),
            post("/api/v1/weights_info", S.WeightsInfo),
            st.just(HttpCase("GET", "/api/v1/sessions")),
            url("/api/v1/sessions/{}", self.pick(self.sessions, True)).map(lambda p: HttpCase("GET", p)),
            st.just(HttpCase("GET", "/api/v1/healthz")),
            st.sampled_from(["/api/v1/audit", "/api/v1/billing/usage/events", "/api/v1/nope"]).map(
                lambda p: HttpCase("GET", p)
            ),
        ]

        def labelled(strategy):
            def label(case: HttpCase) -> HttpCase:
                case.route = case.route or f"{case.method} {_template(case.path)}"
                return case

            return strategy.map(label)

        def auth(case_key):
            case, key = case_key
            case.key = key
            return case

        try:  # the OpenAI-compatible API, where this server has one: bodies from its own models
            from stillroom_server.http_api import openai_api as oai

            routes += [
                post("/oai/api/v1/completions", oai.CompletionBody),
                post("/oai/api/v1/chat/completions", oai.ChatBody),
            ]
        except (ImportError, AttributeError):
            pass
        routes += [self.any_route(method, path) for method, path in uncovered_routes()]
        keys = st.sampled_from(["a"] * 30 + ["none", "wrong"])
        return st.tuples(st.one_of([labelled(r) for r in routes]), keys).map(auth)

    def any_route(self, method: str, template: str) -> st.SearchStrategy[HttpCase]:
        """A route of build_app with no generator of its own above: its path parameters from the
        id pools, a JSON object of random and hostile values as its body, random query parameters."""
        names = re.findall(r"{(\w+)(?::\w+)?}", template)
        ids = {
            "run_id": self.pick(self.runs_any, True, self.world.a_run),
            "session_id": self.pick(self.sessions, True),
            "sampler_id": self.pick(self.samplers, True),
            "kind": st.sampled_from(["weights", "sampler_weights", "x"]),
        }
        params = st.fixed_dictionaries(
            {n: ids.get(n, mostly(st.text(min_size=1, max_size=8), garbage_strings(True), 4)) for n in names}
        )
        body = (
            st.none()
            if method in ("GET", "DELETE")
            else mostly(
                st.dictionaries(
                    st.text(max_size=8),
                    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    max_size=4,
                ),
                st.sampled_from(JSON_WRONG_TYPES),
                4,
            )
        )
        query = st.none() | st.dictionaries(
            st.sampled_from(["limit", "offset", "x"]),
            st.sampled_from(["1", "-1", str(10**30), "NaN", ""]),
            max_size=2,
        )

        def build(parts) -> HttpCase:
            values, payload, query_params = parts
            path = re.sub(r"{(\w+)(?::\w+)?}", lambda m: quote(values[m.group(1)]), template)
            return HttpCase(method, path, payload, params=query_params, route=f"{method} {template}")

        return st.tuples(params, body, query).map(build)

    # the Tinker ForwardBackwardRequest protobuf ---------------------------------------------

    def forward_backward_http(self, path: str) -> st.SearchStrategy[HttpCase]:
        content_type = mostly(
            st.just("application/x-protobuf"),
            st.sampled_from(["application/json", "", "application/x-protobuf; charset=x"]),
            15,
        )
        encoding = mostly(st.just(None), st.sampled_from(["zstd", "gzip", "identity"]), 15)

        def build(parts):
            raw, ctype, enc = parts
            headers = {"content-type": ctype}
            if enc:
                headers["content-encoding"] = enc
            return HttpCase("POST", path, raw=raw, headers=headers)

        return st.tuples(self.tinker_forward_backward(), content_type, encoding).map(build)

    def tinker_forward_backward(self) -> st.SearchStrategy[bytes]:
        w = self.world

        @st.composite
        def message(draw) -> bytes:
            request = tw.ForwardBackwardRequest(
                model_id=draw(self.pick(self.runs_any, False, w.a_run)),
                seq_id=draw(st.sampled_from([SEQ % 2**31] * 6 + [0, -1, 1, 2**31 - 1])),
                loss_fn=draw(mostly(st.sampled_from(LOSSES), garbage_strings(False), 5)),
                forward_only=draw(st.booleans()),
            )
            for _ in range(draw(st.integers(0, 3)) if chance(draw, 8) else 1):
                request.data.append(draw(self.tinker_datum()))
            for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=2, unique=True)):
                valid = self.float_for(key)
                number = draw(
                    mostly(valid if valid is not None else st.floats(0, 2), st.sampled_from(BAD_FLOATS), 4)
                )
                request.loss_fn_config[key] = number
                if draw(st.booleans()):
                    request.loss_fn_config_v2[key].number = number
            if draw(st.integers(0, 5)) == 0:
                teacher = draw(
                    mostly(st.just(TINY), self.pick(self.paths, False) | garbage_strings(False), 4)
                )
                request.loss_fn_config_v2["teacher"].text = teacher
            raw = request.SerializeToString()
            how = draw(st.sampled_from(["whole"] * 14 + ["truncate", "flip", "garbage", "empty"]))
            if how == "truncate" and raw:
                raw = raw[: draw(st.integers(0, len(raw) - 1))]
            elif how == "flip" and raw:
                at = draw(st.integers(0, len(raw) - 1))
                raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
            elif how == "garbage":
                raw = draw(st.binary(max_size=64))
            elif how == "empty":
                raw = b""
            return raw

        return message()

    def tinker_datum(self) -> st.SearchStrategy[tw.Datum]:
        @st.composite
        def datum(draw) -> tw.Datum:
            n = draw(st.integers(1, 6))
            tokens = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
            result = tw_datum(tokens)
            loss = draw(st.sampled_from(["ce", "rl", "rl", "ce"]))
            if loss == "rl":
                result.loss_fn_inputs["advantages"].CopyFrom(tw_dense([1.0] * n, tw.DTYPE_FLOAT32))
                result.loss_fn_inputs["logprobs"].CopyFrom(tw_dense([-1.0] * n, tw.DTYPE_FLOAT32))
            for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
                self._spoil_datum(draw, result, n)
            return result

        return datum()

    def _spoil_datum(self, draw, datum: tw.Datum, n: int) -> None:
        how = draw(
            st.sampled_from(["token", "chunk", "key", "tensor", "tensor", "sparse", "sparse", "spans"])
        )
        if how == "token":
            values = draw(
                st.lists(st.sampled_from([-1, 0, 127, 128, 2**31 - 1, -(2**31), 5]), min_size=1, max_size=4)
            )
            datum.model_input[0].encoded_text.tokens = int32_bytes(values)
        elif how == "chunk":
            kind = draw(st.sampled_from(["image", "dmel", "odd", "empty", "none"]))
            chunk = {
                "image": tw.Chunk(image=tw.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=3)),
                "dmel": tw.Chunk(dmel=tw.DmelChunk(dmel=b"\x01\x02")),
                "odd": tw.Chunk(encoded_text=tw.EncodedTextChunk(tokens=b"\x01\x02\x03")),
                "empty": tw.Chunk(encoded_text=tw.EncodedTextChunk(tokens=b"")),
                "none": tw.Chunk(),
            }[kind]
            datum.model_input.append(chunk)
        elif how == "key":
            key = draw(st.sampled_from(FB_KEYS))
            if key in datum.loss_fn_inputs and draw(st.booleans()):
                del datum.loss_fn_inputs[key]
            else:
                datum.loss_fn_inputs[key].CopyFrom(tw_dense([1.0] * n, tw.DTYPE_FLOAT32))
        elif how == "tensor":
            key = draw(st.sampled_from(FB_KEYS[:4]))
            datum.loss_fn_inputs[key].CopyFrom(draw(self.hostile_tw_tensor(n)))
        elif how == "sparse":
            key = draw(st.sampled_from(FB_KEYS[:4]))
            datum.loss_fn_inputs[key].CopyFrom(draw(self.sparse_tw_tensor(n)))
        else:
            span = tw.ProvenanceSpan(
                prompt_tokens=tw.PromptProvenanceSpan(
                    sequence_id=draw(self.pick(self.futures, False)),
                    offset=draw(st.sampled_from(INT64S)),
                    length=draw(st.sampled_from(INT64S)),
                )
            )
            datum.model_input_spans.append(span)

    def hostile_tw_tensor(self, n: int) -> st.SearchStrategy[tw.Tensor]:
        @st.composite
        def tensor(draw) -> tw.Tensor:
            dtype = draw(
                st.sampled_from(
                    [
                        tw.DTYPE_FLOAT32,
                        tw.DTYPE_INT64,
                        tw.DTYPE_INT32,
                        tw.DTYPE_BFLOAT16,
                        tw.DTYPE_UNSPECIFIED,
                        9,
                        -1,
                    ]
                )
            )
            size = {tw.DTYPE_FLOAT32: 4, tw.DTYPE_INT32: 4, tw.DTYPE_BFLOAT16: 2}.get(dtype, 8)
            count = draw(st.sampled_from([n, n, 0, n + 1, 1]))
            if dtype in (tw.DTYPE_FLOAT32, tw.DTYPE_BFLOAT16):
                values = draw(
                    st.lists(st.sampled_from(BAD_FLOATS + [1.0, 0.5]), min_size=count, max_size=count)
                )
                data = np.asarray(values, dtype="<f4").tobytes()
                if dtype == tw.DTYPE_BFLOAT16:
                    data = (np.frombuffer(data, "<u4") >> 16).astype("<u2").tobytes()
            else:
                values = draw(
                    st.lists(
                        st.sampled_from([1, 2, -1, 128, 2**31 - 1, 2**62, -(2**63)]),
                        min_size=count,
                        max_size=count,
                    )
                )
                data = np.asarray(values, dtype="<i8").astype("<i4" if size == 4 else "<i8").tobytes()
            if draw(st.integers(0, 4)) == 0:
                data = data[:-1] if data else b"\x00"
            shape = draw(
                st.sampled_from(
                    [
                        [count],
                        [count],
                        [],
                        [1, count],
                        [count, 1],
                        [-1],
                        [2**62, 2**62],
                        [0],
                        [count, 0, 3],
                        [1] * 9,
                    ]
                )
            )
            return tw.Tensor(dense=data, dtype=dtype, shape=shape)  # pyright: ignore[reportArgumentType]

        return tensor()

    def sparse_tw_tensor(self, n: int) -> st.SearchStrategy[tw.Tensor]:
        """A [n, k] or [1, n] CSR tensor, with indices right or wrong (backwards, past the end)."""

        @st.composite
        def tensor(draw) -> tw.Tensor:
            rows = draw(st.sampled_from([1, n, 2]))
            cols = draw(st.sampled_from([n, 1, 3]))
            nnz = draw(st.integers(0, 4))
            crow = sorted(draw(st.lists(st.integers(0, nnz), min_size=rows - 1, max_size=rows - 1)))
            crow = [0, *crow, nnz]
            col = draw(st.lists(st.integers(0, max(cols - 1, 0)), min_size=nnz, max_size=nnz))
            spoil = draw(
                st.sampled_from(["none", "backwards", "col", "crow_end", "negative", "huge", "length"])
            )
            if spoil == "backwards" and len(crow) > 1:
                crow = list(reversed(crow))
                crow[0] = draw(st.sampled_from([crow[0], 0]))
            elif spoil == "col" and col:
                col[0] = cols + draw(st.integers(0, 1000))
            elif spoil == "crow_end":
                crow[-1] = nnz + draw(st.integers(1, 10**6))
            elif spoil == "negative":
                (crow if draw(st.booleans()) else (col or crow))[-1] = -draw(st.integers(1, 2**40))
            elif spoil == "huge":
                crow[-1] = 2**62
            elif spoil == "length":
                crow = crow + [nnz]
            dtype = draw(st.sampled_from([tw.DTYPE_FLOAT32, tw.DTYPE_INT64, tw.DTYPE_BFLOAT16]))
            values = np.asarray(
                draw(st.lists(st.sampled_from([1.0, 2.0, math.nan]), min_size=nnz, max_size=nnz)), dtype="<f4"
            )
            if dtype == tw.DTYPE_INT64:
                data = values.astype("<i8").tobytes() if not np.isnan(values).any() else values.tobytes()
            elif dtype == tw.DTYPE_BFLOAT16:
                data = (np.frombuffer(values.tobytes(), "<u4") >> 16).astype("<u2").tobytes()
            else:
                data = values.tobytes()
            csr = tw.SparseCsr(
                values=data,
                crow_indices=np.asarray(crow, "<i8").tobytes(),
                col_indices=np.asarray(col, "<i8").tobytes(),
            )
            shape = draw(st.sampled_from([[rows, cols], [rows, cols], [rows], [rows, cols, 1]]))
            return tw.Tensor(sparse_csr=csr, dtype=dtype, shape=shape)  # pyright: ignore[reportArgumentType]

        return tensor()

    # gRPC messages from descriptors -----------------------------------------------------

    def grpc_calls(self) -> st.SearchStrategy[tuple[str, bytes]]:
        service = pb.DESCRIPTOR.services_by_name["Stillroom"]
        calls = []
        for method in service.methods:
            calls.append(
                self.message(method.input_type, method.name).map(lambda m, name=method.name: (name, m))
            )
        message = st.one_of(calls)

        def spoil(pair):
            (name, request), how, cut = pair
            raw = request.SerializeToString()
            if how == "truncate" and raw:
                raw = raw[: cut % len(raw)]
            elif how == "garbage":
                raw = bytes([0xFF, 0x0A, 0x80]) * (cut % 7 + 1)
            return name, raw

        return st.tuples(
            message, st.sampled_from(["whole"] * 20 + ["truncate", "garbage"]), st.integers(0, 10**6)
        ).map(spoil)

    def message(self, descriptor, method: str = "", depth: int = 0) -> st.SearchStrategy:
        cls = message_factory.GetMessageClass(descriptor)
        if descriptor.full_name == "stillroom.v1.Tensor":
            return self.pb_tensor()
        if descriptor.full_name == "stillroom.v1.ModelInput":
            return self.pb_model_input()
        if descriptor.full_name == "stillroom.v1.Datum":
            return mostly(self.pb_datum(), self._message(descriptor, cls, method, depth), 4)
        return self._message(descriptor, cls, method, depth)

    def pb_datum(self) -> st.SearchStrategy[pb.Datum]:
        """A datum a loss can take (tokens, targets and weights of one length; an RL loss's inputs at
        times), spoiled now and then by one hostile tensor."""

        @st.composite
        def datum(draw) -> pb.Datum:
            n = draw(st.integers(1, 6))
            tokens = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
            inputs = {
                "target_tokens": pb_tensor(tokens[1:] + [2], pb.INT64),
                "weights": pb_tensor([1.0] * n, pb.FLOAT32),
            }
            if draw(st.booleans()):
                inputs["advantages"] = pb_tensor([1.0] * n, pb.FLOAT32)
                inputs["logprobs"] = pb_tensor([-1.0] * n, pb.FLOAT32)
            if draw(st.integers(0, 2**16)) % 3 == 1:
                inputs[draw(st.sampled_from(FB_KEYS))] = draw(self.pb_tensor())
            return pb.Datum(model_input=pb_prompt(tokens), loss_fn_inputs=inputs)

        return datum()

    def _message(self, descriptor, cls, method: str, depth: int) -> st.SearchStrategy:
        if depth > 4:
            return st.just(cls())

        @st.composite
        def build(draw):
            message = cls()
            chosen_oneofs = {  # a member of each oneof, or (one time in eight) none
                o.name: None if chance(draw, 8) else draw(st.sampled_from([f.name for f in o.fields]))
                for o in descriptor.oneofs
                if not o.name.startswith("_")
            }
            for field in descriptor.fields:
                oneof = field.containing_oneof
                if oneof is not None and oneof.name.startswith("_"):
                    oneof = None  # proto3 `optional`: a synthetic oneof of one field
                if oneof is not None and chosen_oneofs[oneof.name] != field.name:
                    continue
                if oneof is None:  # leave a field out now and then; one that may be absent, often
                    optional = field.containing_oneof is not None  # declared `optional` (synthetic oneof)
                    tensor = field.message_type is not None and field.message_type.name == "Tensor"
                    if optional and tensor and not chance(draw, 4):
                        continue  # an optional tensor (target_prompt_logprobs) is rare and mostly wrong
                    if chance(draw, 2 if optional else 10):
                        continue
                self._set_field(draw, message, field, method, depth)
            return message

        return build()

    def _set_field(self, draw, message, field, method: str, depth: int) -> None:
        FD = _descriptor.FieldDescriptor
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            target = getattr(message, field.name)
            keys = (
                CONFIG_KEYS
                if "loss_fn_config" in field.name
                else (FB_KEYS if field.name == "loss_fn_inputs" else None)
            )
            key_strategy = (
                mostly(st.sampled_from(keys), garbage_strings(False), 5) if keys else st.text(max_size=8)
            )
            assert key_field.type == FD.TYPE_STRING
            for key in draw(st.lists(key_strategy, max_size=3, unique=True)):
                if value_field.message_type is not None:
                    target[key].CopyFrom(draw(self.message(value_field.message_type, method, depth + 1)))
                else:
                    target[key] = draw(self._scalar(value_field, key))
            return
        if field.is_repeated:
            count = draw(st.integers(0, 3) if field.name != "data" else st.sampled_from([1, 1, 1, 0, 2]))
            target = getattr(message, field.name)
            for _ in range(count):
                if field.message_type is not None:
                    target.append(draw(self.message(field.message_type, method, depth + 1)))
                else:
                    target.append(draw(self._scalar(field, field.name)))
            return
        if field.message_type is not None:
            getattr(message, field.name).CopyFrom(draw(self.message(field.message_type, method, depth + 1)))
            return
        setattr(message, field.name, draw(self._scalar(field, field.name)))

    def _scalar(self, field, name: str) -> st.SearchStrategy:
        FD = _descriptor.FieldDescriptor
        kind = field.type
        if kind == FD.TYPE_STRING:
            named = self.string_for(name, False)
            return named if named is not None else mostly(st.text(max_size=8), garbage_strings(False), 6)
        if kind == FD.TYPE_BOOL:
            return st.booleans()
        if kind == FD.TYPE_BYTES:
            return st.binary(max_size=16)
        if kind == FD.TYPE_ENUM:
            return st.sampled_from([v.number for v in field.enum_type.values] + [7, -3])
        if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            valid = self.float_for(name)
            valid = valid if valid is not None else st.floats(-5, 5)
            return mostly(valid, st.sampled_from(BAD_FLOATS + [1e30]), 10)
        bits = 32 if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32) else 64
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        hostile = st.sampled_from([v for v in HUGE_INTS if low <= v <= high]) | st.integers(low, high)
        valid = self.int_for(name)
        valid = valid if valid is not None else st.integers(-3, 50)
        return mostly(valid, hostile, 10).map(lambda v: v if low <= v <= high else v % (high + 1))

    def pb_tensor(self) -> st.SearchStrategy[pb.Tensor]:
        @st.composite
        def tensor(draw) -> pb.Tensor:
            n = draw(st.integers(1, 6))
            if not chance(draw, 4):
                if draw(st.booleans()):
                    return pb_tensor(draw(st.lists(st.integers(1, 100), min_size=n, max_size=n)), pb.INT64)
                return pb_tensor([1.0] * n, pb.FLOAT32)
            dtype = draw(st.sampled_from([pb.INT64, pb.FLOAT32, pb.DTYPE_UNSPECIFIED, 7]))
            values = draw(
                st.lists(
                    st.sampled_from([1, 0, -1, 128, 2**62, -(2**63)])
                    if dtype != pb.FLOAT32
                    else st.sampled_from(BAD_FLOATS + [1.0]),
                    min_size=n,
                    max_size=n,
                )
            )
            data = np.asarray(values, dtype="<f4" if dtype == pb.FLOAT32 else "<i8").tobytes()
            if draw(st.integers(0, 3)) == 0:
                data = data[: -draw(st.integers(1, 7))]
            shape = draw(st.sampled_from([[n], [n], [1, n], [-1], [2**62, 2**62], [], [n + 1], [0]]))
            return pb.Tensor(dtype=dtype, shape=shape, data=data)  # pyright: ignore[reportArgumentType]

        return tensor()

    def pb_model_input(self) -> st.SearchStrategy[pb.ModelInput]:
        tokens = st.lists(st.integers(1, 100), min_size=1, max_size=6).map(lambda t: pb_tensor(t, pb.INT64))
        tensors = mostly(st.lists(tokens, min_size=1, max_size=2), st.lists(self.pb_tensor(), max_size=2), 6)
        return tensors.map(
            lambda tensors: pb.ModelInput(
                chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=t)) for t in tensors]
            )
        )


# The routes of build_app that http_cases has a generator of its own for: (method, path template).
COVERED_ROUTES = {
    ("POST", "/api/v1/client/config"),
    ("POST", "/api/v1/client/dynamic_config"),
    ("POST", "/api/v1/create_session"),
    ("POST", "/api/v1/session_heartbeat"),
    ("POST", "/api/v1/sessions/{session_id}/finish"),
    ("POST", "/api/v1/telemetry"),
    ("GET", "/api/v1/get_server_capabilities"),
    ("POST", "/api/v1/create_model"),
    ("POST", "/api/v1/get_info"),
    ("POST", "/api/v1/unload_model"),
    ("POST", "/api/v1/forward_backward"),
    ("POST", "/api/v1/forward"),
    ("POST", "/api/v1/optim_step"),
    ("POST", "/api/v1/save_weights"),
    ("POST", "/api/v1/save_weights_for_sampler"),
    ("POST", "/api/v1/load_weights"),
    ("POST", "/api/v1/create_sampling_session"),
    ("GET", "/api/v1/samplers/{sampler_id}"),
    ("POST", "/api/v1/asample"),
    ("POST", "/api/v1/retrieve_future"),
    ("GET", "/api/v1/training_runs"),
    ("GET", "/api/v1/training_runs/{run_id}"),
    ("GET", "/api/v1/training_runs/{run_id}/checkpoints"),
    ("GET", "/api/v1/checkpoints"),
    ("DELETE", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}"),
    ("PUT", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl"),
    ("POST", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/publish"),
    ("GET", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls"),
    ("POST", "/api/v1/weights_info"),
    ("GET", "/api/v1/sessions"),
    ("GET", "/api/v1/sessions/{session_id}"),
    ("GET", "/api/v1/healthz"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/billing/{rest:path}"),
    ("POST", "/oai/api/v1/completions"),
    ("POST", "/oai/api/v1/chat/completions"),
}


class _Anything:
    """Stands in for TinkerApi (and its parts) so that build_app can be called to list its routes."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args, **kwargs) -> Any:
        return None


def app_routes() -> list[tuple[str, str]]:
    """Every (method, path template) the Tinker HTTP app serves, read from build_app itself."""
    from stillroom_server.http_api.routes import build_app

    try:
        app = build_app(_Anything())  # pyright: ignore[reportArgumentType]
    except Exception:  # noqa: BLE001 - a part of the app that needs a real TinkerApi: fuzz the known routes
        return sorted(COVERED_ROUTES)
    found = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, getattr(route, "path", "")))
    return found


def uncovered_routes() -> list[tuple[str, str]]:
    return [route for route in app_routes() if route not in COVERED_ROUTES]


def _template(path: str) -> str:
    parts = path.split("/")
    known = {
        "api",
        "v1",
        "training_runs",
        "checkpoints",
        "sessions",
        "samplers",
        "finish",
        "ttl",
        "publish",
        "external_weights_urls",
        "",
    }
    return "/".join(
        p if p in known or not any(c in p for c in "%:-.") and len(p) < 30 and p.isidentifier() else "{}"
        for p in parts
    )


def quote(value: str) -> str:
    """A path segment (at most 2000 characters: a longer URL is refused by the client itself)."""
    from urllib.parse import quote as url_quote

    return url_quote(value[:2000].encode("utf-8", errors="surrogatepass"), safe="")


def _adam_params(case: HttpCase) -> HttpCase:
    """The SDK's OptimStepRequest serialises `optim_params` as `adam_params` (its model's alias)."""
    if isinstance(case.body, dict) and "optim_params" in case.body:
        case.body = {("adam_params" if k == "optim_params" else k): v for k, v in case.body.items()}
    return case


def _unload_target(body: Any, world: World) -> Any:
    """unload_model may take out only A's spare run (A's main runs must keep serving the fuzzer)."""
    if isinstance(body, dict) and body.get("model_id") in (world.a_run, world.a_grpc_run):
        return {**body, "model_id": world.a_spare_run}
    return body


def _spare_only(case: HttpCase, world: World) -> HttpCase:
    """Deleting or expiring A's main checkpoints would starve the fuzzer: aim those at a spare."""
    for path in world.a_paths:
        run, kind, name = stillroom_path(path).removeprefix("stillroom://").split("/")
        if f"/{quote(run)}/checkpoints/{kind}/{name}" in case.path and world.a_spare_paths:
            spare_run, spare_kind, spare_name = (
                stillroom_path(world.a_spare_paths[0]).removeprefix("stillroom://").split("/")
            )
            case.path = case.path.replace(
                f"/{quote(run)}/checkpoints/{kind}/{name}",
                f"/{quote(spare_run)}/checkpoints/{spare_kind}/{spare_name}",
            )
    return case


# ---------------------------------------------------------------- the fuzzer


class Fuzzer:
    """Sends cases to `server` as owner A and checks each answer; `problems` collects what broke."""

    def __init__(self, server: FuzzServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.http_url, timeout=90)
        self.channel = grpc.insecure_channel(
            server.grpc_address,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.counts: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.routes: collections.Counter[str] = collections.Counter()  # by route (or method) and status
        self.problems: list[str] = []
        self.world = World()
        self.b_before: dict | None = None
        self._last_beat = time.monotonic()

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    # plumbing -------------------------------------------------------------

    def _headers(self, key: str) -> dict:
        secret = {"a": self.server.key_a, "b": self.server.key_b, "wrong": "sr-wrong-key"}.get(key)
        return {"X-API-Key": secret} if secret else {}

    def post(self, path: str, body: Any, key: str = "a") -> httpx.Response:
        return self.http.post(
            path, content=json_text(body), headers={**self._headers(key), "content-type": "application/json"}
        )

    def grpc(self, method: str, request, key: str = "a", timeout: float = 60) -> tuple[str, Any]:
        """A raw unary call: (code name, response bytes or the error's details)."""
        if method == "Submit":
            call = self.channel.unary_stream(
                f"/stillroom.v1.Stillroom/{method}", request_serializer=_raw, response_deserializer=_raw
            )
        else:
            call = self.channel.unary_unary(
                f"/stillroom.v1.Stillroom/{method}", request_serializer=_raw, response_deserializer=_raw
            )
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        secret = {"a": self.server.key_a, "b": self.server.key_b}[key]
        try:
            answer = call(raw, metadata=(("authorization", f"Bearer {secret}"),), timeout=timeout)
            if method == "Submit":
                return "OK", list(answer)
            return "OK", answer
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""  # pyright: ignore[reportAttributeAccessIssue]

    def grpc_ok(self, method: str, request, response_type, key: str = "a"):
        code, answer = self.grpc(method, request, key)
        if code != "OK":
            raise AssertionError(f"{method} as {key}: {code} {answer}")
        return response_type.FromString(answer)

    def wait_http(self, request_id: str, key: str = "a", seconds: float = 120) -> httpx.Response:
        deadline = time.monotonic() + seconds
        while True:
            answer = self.post("/api/v1/retrieve_future", {"request_id": request_id}, key)
            pending = (
                answer.status_code == 200
                and answer.headers.get("content-type", "").startswith("application/json")
                and answer.json().get("type") == "try_again"
            )
            if not pending or time.monotonic() > deadline:
                return answer
            time.sleep(0.05)

    def http_future(self, answer: httpx.Response, key: str = "a") -> httpx.Response:
        assert answer.status_code == 200, answer.text
        result = self.wait_http(answer.json()["request_id"], key)
        assert result.status_code == 200 and "error" not in result.text[:200], result.text
        return result

    def wait_grpc(self, request_id: str, key: str = "a", timeout: float = 60) -> pb.FutureResult:
        return self.grpc_ok(
            "RetrieveFuture",
            pb.RetrieveFutureRequest(request_id=request_id, timeout_seconds=timeout),
            pb.FutureResult,
            key,
        )

    def last_seq(self, run_id: str, key: str = "a") -> int:
        return self.grpc_ok(
            "GetTrainingRun", pb.GetTrainingRunRequest(training_run_id=run_id), pb.TrainingRunInfo, key
        ).last_request_seq

    # the world -------------------------------------------------------------

    def setup(self) -> World:
        """Both owners' runs, checkpoints, sessions, samplers and futures, over both wires."""
        w = self.world
        for key in ("b", "a"):
            session = self.post(
                "/api/v1/create_session",
                {
                    "tags": [f"{key}-tag" if key == "a" else MARK_B],
                    "user_metadata": {"who": key if key == "a" else MARK_B},
                },
                key,
            ).json()["session_id"]
            created = self.post(
                "/api/v1/create_model",
                {
                    "session_id": session,
                    "model_seq_id": 0,
                    "base_model": TINY,
                    "lora_config": {"rank": 4, "seed": 1},
                    "user_metadata": {"who": key if key == "a" else MARK_B},
                },
                key,
            )
            run = created.json()["model_id"]
            self.http_future(created, key)
            futures = []
            fb = tw.ForwardBackwardRequest(
                model_id=run, seq_id=1, loss_fn="cross_entropy", data=[tw_datum([1, 40, 41, 42])]
            )
            answer = self.http.post(
                "/api/v1/forward_backward",
                content=fb.SerializeToString(),
                headers={**self._headers(key), "content-type": "application/x-protobuf"},
            )
            futures.append(answer.json()["request_id"])
            self.http_future(answer, key)
            answer = self.post(
                "/api/v1/optim_step",
                {"model_id": run, "seq_id": 2, "adam_params": {"learning_rate": 1e-2}},
                key,
            )
            futures.append(answer.json()["request_id"])
            self.http_future(answer, key)
            paths = []
            for seq, (route, name) in enumerate(
                [
                    ("save_weights_for_sampler", f"{key}-ckpt"),
                    ("save_weights", f"{key}-ckpt"),
                    ("save_weights_for_sampler", f"{key}-spare"),
                ],
                start=3,
            ):
                answer = self.post(
                    f"/api/v1/{route}",
                    {
                        "model_id": run,
                        "seq_id": seq,
                        "path": name,
                        "user_metadata": {"who": key if key == "a" else MARK_B},
                    },
                    key,
                )
                futures.append(answer.json()["request_id"])
                paths.append(self.http_future(answer, key).json()["path"])
            sampler = self.post(
                "/api/v1/create_sampling_session", {"session_id": session, "model_path": paths[0]}, key
            ).json()["sampling_session_id"]
            answer = self.post(
                "/api/v1/asample",
                {
                    "sampling_session_id": sampler,
                    "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 40]}]},
                    "sampling_params": {"max_tokens": 2},
                },
                key,
            )
            futures.append(answer.json()["request_id"])
            self.http_future(answer, key)
            # and over gRPC
            grpc_run = self.grpc_ok(
                "CreateTrainingRun",
                pb.CreateTrainingRunRequest(
                    base_model=TINY,
                    lora=pb.LoraConfig(rank=4, train_mlp=True, train_attn=True, train_unembed=True),
                    user_metadata={"who": key if key == "a" else MARK_B},
                ),
                pb.TrainingRunInfo,
                key,
            ).training_run_id
            ref = self.grpc_ok(
                "SaveWeightsForSampler",
                pb.SaveWeightsRequest(training_run_id=grpc_run, seq=1, name=f"{key}-grpc"),
                pb.FutureRef,
                key,
            )
            futures.append(ref.request_id)
            grpc_path = self.wait_grpc(ref.request_id, key).save_weights.path
            grpc_sampler = self.grpc_ok(
                "CreateSamplingSession",
                pb.CreateSamplingSessionRequest(model_path=grpc_path),
                pb.SamplingSessionInfo,
                key,
            ).sampling_session_id
            if key == "b":
                w.b_session, w.b_run, w.b_grpc_run = session, run, grpc_run
                w.b_sampler, w.b_grpc_sampler = sampler, grpc_sampler
                w.b_paths, w.b_futures = [*paths, grpc_path], futures
            else:
                w.a_session, w.a_run, w.a_grpc_run = session, run, grpc_run
                w.a_sampler, w.a_grpc_sampler = sampler, grpc_sampler
                w.a_paths, w.a_spare_paths, w.a_futures = [paths[0], paths[1], grpc_path], [paths[2]], futures
        w.a_spare_session = self.post("/api/v1/create_session", {"tags": []}).json()["session_id"]
        w.a_spare_run = self.grpc_ok(
            "CreateTrainingRun", pb.CreateTrainingRunRequest(base_model=TINY), pb.TrainingRunInfo
        ).training_run_id
        self.b_before = self.b_state()
        return w

    def b_state(self) -> dict:
        """What A must not be able to change: B's runs' sequence numbers, checkpoints (with their
        expiry), the logprobs of B's run's current weights (a forward, which changes nothing) and of
        B's sampler snapshot."""
        w = self.world
        checkpoints = self.grpc_ok(
            "ListCheckpoints", pb.ListCheckpointsRequest(), pb.ListCheckpointsResponse, "b"
        )
        listed = sorted((c.path, c.expires_at, c.size_bytes) for c in checkpoints.checkpoints)
        seqs = {run: self.last_seq(run, "b") for run in (w.b_run, w.b_grpc_run)}
        forward = tw.ForwardBackwardRequest(
            model_id=w.b_run,
            seq_id=seqs[w.b_run] + 1,
            loss_fn="cross_entropy",
            forward_only=True,
            data=[tw_datum([1, 40, 41, 42, 43])],
        )
        answer = self.http.post(
            "/api/v1/forward",
            content=forward.SerializeToString(),
            headers={**self._headers("b"), "content-type": "application/x-protobuf"},
        )
        output = tw.ForwardBackwardOutput.FromString(self.http_future(answer, "b").content)
        logprobs = self.post(
            "/api/v1/asample",
            {
                "sampling_session_id": w.b_sampler,
                "num_samples": 1,
                "prompt_logprobs": True,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 40, 41, 42]}]},
                "sampling_params": {"max_tokens": 1},
            },
            "b",
        )
        snapshot = tw.SampleResponse.FromString(self.http_future(logprobs, "b").content).prompt_logprobs
        return {
            "checkpoints": listed,
            "seqs": seqs,
            "forward": output.loss_fn_outputs[0].fields["logprobs"].data,
            "snapshot": snapshot,
        }

    # sending and checking -----------------------------------------------------

    def _fill_seq(self, body: Any, run_id: Any) -> Any:
        if run_id in (self.world.a_run, self.world.a_grpc_run, self.world.a_spare_run):
            try:
                return walk_replace(body, SEQ, self.last_seq(run_id) + 1)
            except AssertionError:
                return walk_replace(body, SEQ, 1)
        return walk_replace(body, SEQ, 1)

    def keep_sessions(self) -> None:
        """Heartbeat both owners' client sessions now and then, or the server ends them (and B's run)."""
        if time.monotonic() - self._last_beat < 30:
            return
        self._last_beat = time.monotonic()
        for key, session in (("a", self.world.a_session), ("b", self.world.b_session)):
            self.post("/api/v1/session_heartbeat", {"session_id": session}, key)

    def send_http(self, case: HttpCase) -> None:
        self.keep_sessions()
        self.counts["http"] += 1
        if case.raw is not None:
            raw = self._fill_proto_seq(case.raw)
        elif case.body is not None:
            run_id = case.body.get("model_id") if isinstance(case.body, dict) else None
            raw = json_text(self._fill_seq(case.body, run_id))
        else:
            raw = None
        headers = {**self._headers(case.key), **case.headers}
        if case.body is not None and "content-type" not in headers:
            headers["content-type"] = "application/json"
        try:
            answer = self.http.request(
                case.method, case.path, params=case.params, content=raw, headers=headers
            )
        except httpx.TransportError as error:
            self.problem("http", case.describe(), f"dropped connection: {type(error).__name__}: {error}")
            return
        except (httpx.InvalidURL, UnicodeError):
            self.counts["http unsendable"] += 1  # refused by the client library: never sent
            return
        self.statuses[f"http {answer.status_code}"] += 1
        self.routes[f"{case.route} {answer.status_code}"] += 1
        from urllib.parse import unquote

        sent = (raw or b"") + f" {unquote(case.path)} {case.params}".encode("utf-8", errors="surrogatepass")
        self.check_text("http", case.describe(), answer.text, sent, error=answer.status_code >= 300)
        if answer.status_code >= 500:
            self.problem("http", case.describe(), f"{answer.status_code} {answer.text[:500]}")
            return
        if (
            answer.status_code == 200
            and "request_id" in answer.text[:300]
            and case.path != "/api/v1/retrieve_future"
        ):
            request_id = answer.json().get("request_id")
            if case.path == "/api/v1/optim_step" and isinstance(request_id, str):
                self.replay(case, raw or b"", request_id)
            if isinstance(request_id, str) and self.settled(request_id):
                result = self.wait_http(request_id, seconds=3)
                self.counts["http polls"] += 1
                if result.status_code >= 500:
                    self.problem(
                        "http", case.describe(), f"its future: {result.status_code} {result.text[:500]}"
                    )
                elif result.headers.get("content-type", "").startswith("application/json"):
                    payload = result.json()
                    if payload.get("category") == "server" or payload.get("code") in BAD_GRPC:
                        self.problem(
                            "http", case.describe(), f"its future failed as a server error: {payload}"
                        )
                self.check_text(
                    "http", case.describe(), result.text, sent, error="error" in result.text[:100]
                )

    def replay(self, case: HttpCase, raw: bytes, request_id: str) -> None:
        """An accepted optim_step sent again: the same bytes are a retry (the same future); with
        another learning rate under the same seq_id it must be refused, not answered with the first."""
        self.counts["http replays"] += 1
        headers = {**self._headers(case.key), "content-type": "application/json"}
        again = self.http.post(case.path, content=raw, headers=headers)
        if again.status_code != 200 or again.json().get("request_id") != request_id:
            self.problem(
                "http", case.describe(), f"a retry of the same bytes: {again.status_code} {again.text[:300]}"
            )
        try:
            body = json.loads(raw)
        except ValueError:
            return
        params = body.get("adam_params") if isinstance(body, dict) else None
        if not isinstance(params, dict):
            return
        body["adam_params"] = {**params, "learning_rate": 0.123456}
        other = self.http.post(case.path, content=json_text(body), headers=headers)
        if other.status_code == 200 and other.json().get("request_id") == request_id:
            self.problem(
                "http",
                case.describe(),
                "the same seq_id with another body was answered with the first request's future",
            )
        elif other.status_code >= 500:
            self.problem(
                "http", case.describe(), f"a replay with another body: {other.status_code} {other.text[:300]}"
            )

    def settled(self, request_id: str) -> bool:
        """Whether A's future is done within 2 s (asked over gRPC, which waits no longer than told;
        HTTP's retrieve_future holds a pending one for 30 s)."""
        code, answer = self.grpc(
            "RetrieveFuture", pb.RetrieveFutureRequest(request_id=request_id, timeout_seconds=2)
        )
        return code == "OK" and pb.FutureResult.FromString(answer).status != pb.PENDING

    def _fill_proto_seq(self, raw: bytes) -> bytes:
        try:
            message = tw.ForwardBackwardRequest.FromString(raw)
        except Exception:  # noqa: BLE001 - garbage stays garbage
            return raw
        if message.seq_id != SEQ % 2**31:
            return raw
        message.seq_id = self._fill_seq(SEQ, message.model_id)
        return message.SerializeToString()

    def send_grpc(self, method: str, raw: bytes) -> None:
        self.keep_sessions()
        self.counts["grpc"] += 1
        raw = self._fill_grpc_seq(method, raw)
        raw = self._spare_a(method, raw)
        code, answer = self.grpc(method, raw)
        self.statuses[f"grpc {code}"] += 1
        self.routes[f"grpc {method} {code}"] += 1
        where = f"{method} {raw[:400]!r}{'...' if len(raw) > 400 else ''}"
        if code in BAD_GRPC:
            self.problem("grpc", where, f"{code} {answer!s:.500}")
            return
        if code != "OK":
            self.check_text("grpc", where, str(answer), raw)
            return
        if method == "Submit":
            self.check_text("grpc", where, b"".join(answer).decode("latin-1"), raw, error=b"refused" in raw)
            for event in (pb.SubmitEvent.FromString(e) for e in answer):
                for accepted in event.accepted:
                    if accepted.refused.code in BAD_GRPC:
                        self.problem("grpc", where, f"item refused as {accepted.refused}")
                if event.HasField("result") and event.result.error.code in BAD_GRPC:
                    self.problem("grpc", where, f"item failed as {event.result.error}")
            return
        self.check_text("grpc", where, answer.decode("latin-1"), raw, error=False)
        if method in (
            "ForwardBackward",
            "OptimStep",
            "SaveWeightsForSampler",
            "Sample",
            "ComputeLogprobs",
            "SaveState",
            "LoadState",
        ):
            request_id = pb.FutureRef.FromString(answer).request_id
            self.counts["grpc polls"] += 1
            code, result = self.grpc(
                "RetrieveFuture", pb.RetrieveFutureRequest(request_id=request_id, timeout_seconds=2)
            )
            if code != "OK":
                self.problem("grpc", where, f"its future: {code} {result}")
                return
            future = pb.FutureResult.FromString(result)
            if future.status == pb.FAILED and future.error.code in BAD_GRPC:
                self.problem("grpc", where, f"its future failed as a server error: {future.error}")
            self.check_text("grpc", where, result.decode("latin-1"), raw, error=future.status == pb.FAILED)

    def _spare_a(self, method: str, raw: bytes) -> bytes:
        """Closing A's main runs or session, or deleting (expiring) A's main checkpoints, would starve
        the fuzzer: aim those calls at A's spares."""
        w = self.world
        try:
            if method == "CloseTrainingRun":
                request = pb.GetTrainingRunRequest.FromString(raw)
                if request.training_run_id in (w.a_run, w.a_grpc_run):
                    request.training_run_id = w.a_spare_run
                    return request.SerializeToString()
            if method == "EndClientSession":
                request = pb.EndClientSessionRequest.FromString(raw)  # pyright: ignore[reportAttributeAccessIssue]
                if request.session_id == w.a_session:
                    request.session_id = w.a_spare_session
                    return request.SerializeToString()
            if method in ("DeleteCheckpoint", "SetCheckpointTtl"):
                cls = pb.CheckpointPathRequest if method == "DeleteCheckpoint" else pb.SetCheckpointTtlRequest
                request = cls.FromString(raw)
                mains = {f(p) for p in w.a_paths for f in (stillroom_path, tinker_path)}
                if request.path in mains:
                    request.path = stillroom_path(w.a_spare_paths[0])
                    return request.SerializeToString()
        except Exception:  # noqa: BLE001 - garbage stays garbage
            pass
        return raw

    def _fill_grpc_seq(self, method: str, raw: bytes) -> bytes:
        """Write run's next seq where the generator left the placeholder (the field keeps int64s)."""
        service = pb.DESCRIPTOR.services_by_name["Stillroom"]
        cls = message_factory.GetMessageClass(service.methods_by_name[method].input_type)
        try:
            message = cls.FromString(raw)
        except Exception:  # noqa: BLE001 - garbage stays garbage
            return raw
        changed = False

        def visit(m) -> None:
            nonlocal changed
            for field, value in m.ListFields():
                if field.name == "seq" and value == SEQ:
                    m.seq = self._fill_seq(SEQ, getattr(m, "training_run_id", None))
                    changed = True
                elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                    for item in value if field.is_repeated else [value]:
                        visit(item)

        visit(message)
        return message.SerializeToString() if changed else raw

    def check_text(self, wire: str, where: str, text: str, sent: bytes, error: bool = True) -> None:
        """No data dir in an error, no traceback, nothing of B's that A's request did not name itself.
        (A success may name a path under the data dir: get_info's tokenizer_id is a local folder.)"""
        data_dir = str(self.server.data_dir)
        if error and data_dir in text:
            self.problem(wire, where, f"the answer shows the data dir: {text[:300]}")
        if "Traceback (most recent call last)" in text or 'File "/' in text:
            self.problem(wire, where, f"the answer shows a traceback: {text[:300]}")
        sent_text = sent.decode("latin-1")
        for secret in [MARK_B, *self.world.b_ids()]:
            if (
                secret in text
                and secret not in sent_text
                and stillroom_path(secret) not in sent_text
                and tinker_path(secret) not in sent_text
            ):
                self.problem(wire, where, f"the answer shows B's {secret!r}: {text[:300]}")

    def problem(self, wire: str, where: str, what: str) -> None:
        alive = "" if self.server.alive() else " [THE SERVER PROCESS DIED]"
        self.problems.append(f"[{wire}] {what}{alive}\n    request: {where}")

    def final_problems(self) -> list[str]:
        """The server alive and healthy on both wires, and B's things as they were."""
        problems = []
        if not self.server.alive():
            return [
                f"the server process died (exit {self.server.process.returncode}): {self.server.log_tail()}"
            ]
        health = self.http.get("/api/v1/healthz")
        if health.status_code != 200 or health.json().get("status") != "ok":
            problems.append(f"/api/v1/healthz: {health.status_code} {health.text[:200]}")
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub: Any = health_pb2_grpc.HealthStub(self.channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            problems.append(f"gRPC health: {status}")
        assert self.b_before is not None
        before = dict(self.b_before)
        before["seqs"] = {
            run: seq + (1 if run == self.world.b_run else 0) for run, seq in before["seqs"].items()
        }
        after = self.b_state()  # the first state's own forward took one seq of B's run
        for name in before:
            if name in ("forward", "snapshot"):  # logprobs: equal up to float noise (batching)
                old, new = (np.frombuffer(state[name], "<f4") for state in (before, after))
                if old.shape == new.shape and np.allclose(old, new, rtol=1e-4, atol=1e-4, equal_nan=True):
                    continue
            if before[name] != after[name]:
                problems.append(
                    f"owner B's {name} changed while A fuzzed: {before[name]!r:.300} -> {after[name]!r:.300}"
                )
        self.b_before = after
        return problems

    def summary(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (
            f"{self.counts['http']} HTTP requests and {self.counts['grpc']} gRPC calls fuzzed "
            f"(plus {self.counts['http polls']} + {self.counts['grpc polls']} future polls and "
            f"{self.counts['http replays']} seq replays); {statuses}"
        )


def _raw(data: bytes) -> bytes:
    return data
