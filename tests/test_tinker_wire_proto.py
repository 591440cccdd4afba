"""protos/tinker_wire/v1/tinker_wire.proto matches the official SDK's `tinker_public.proto` field by
field (names, numbers, types, labels, enum values), so the server reads and writes the bytes the
SDK does; only the package name differs, which the wire never carries."""

from __future__ import annotations

import pytest

from stillroom_server.http_api._proto import tinker_wire_pb2 as ours

theirs = pytest.importorskip("tinker.proto.tinker_public_pb2",
                             reason="the official tinker SDK is a test dependency")


def shape(descriptor) -> dict:
    fields = {f.name: (f.number, f.type, f.is_repeated, f.message_type.name if f.message_type else None,
                       f.enum_type.name if f.enum_type else None,
                       f.containing_oneof.name if f.containing_oneof else None)
              for f in descriptor.fields}
    nested = {n.name: shape(n) for n in descriptor.nested_types}
    return {"fields": fields, "nested": nested}


def test_every_message_and_enum_of_the_sdk_matches():
    their_file, our_file = theirs.DESCRIPTOR, ours.DESCRIPTOR
    assert set(their_file.message_types_by_name) == set(our_file.message_types_by_name)
    for name, message in their_file.message_types_by_name.items():
        assert shape(our_file.message_types_by_name[name]) == shape(message), name
    assert set(their_file.enum_types_by_name) == set(our_file.enum_types_by_name)
    for name, enum in their_file.enum_types_by_name.items():
        ours_enum = our_file.enum_types_by_name[name]
        assert {v.name: v.number for v in ours_enum.values} == {v.name: v.number for v in enum.values}


def test_bytes_written_by_the_sdk_parse_the_same_here():
    request = theirs.ForwardBackwardRequest(model_id="s:train:0", seq_id=3, loss_fn="ppo",
                                            loss_fn_config={"clip_low_threshold": 0.8})
    request.loss_fn_config_v2["teacher"].text = "tinker://r/sampler_weights/t"
    datum = request.data.add()
    datum.model_input.add().encoded_text.tokens = bytes(range(8))
    datum.loss_fn_inputs["weights"].dense = b"\x00\x00\x80?" * 2
    parsed = ours.ForwardBackwardRequest.FromString(request.SerializeToString())
    assert parsed.SerializeToString(deterministic=True) == request.SerializeToString(deterministic=True)
