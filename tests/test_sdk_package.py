"""The SDK installs and imports without the server's heavy dependencies, and its generated
protocol code matches protos/."""

import subprocess
import sys
from pathlib import Path

import pytest

from stillroom import _wire, types

ROOT = Path(__file__).resolve().parent.parent


def test_import_does_not_pull_in_torch_transformers_or_sqlalchemy():
    code = ("import sys, stillroom; heavy = [m for m in ('torch', 'transformers', 'sqlalchemy', "
            "'numpy', 'stillroom_server') if m in sys.modules]; print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_protocol_code_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tensors_travel_as_packed_bytes():
    tensor = types.TensorData(data=[1.5, -2.0, 3.25, 0.0], dtype="float32", shape=[2, 2])
    message = _wire.tensor_to_pb(tensor)
    assert len(message.data) == 16 and list(message.shape) == [2, 2]
    assert _wire.tensor_from_pb(message) == tensor
    tokens = _wire.pack([0, 2**40, -1], "int64")
    assert _wire.unpack(tokens) == [0, 2**40, -1]


def test_plain_lists_in_a_datum_are_typed_by_key():
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1, 1, 0]})
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["weights"].dtype == "float32"
    assert datum.loss_fn_inputs["weights"].data == [1.0, 1.0, 0.0]


def test_model_input_helpers():
    model_input = types.ModelInput.from_ints([5, 6]).append_int(7)
    assert model_input.to_ints() == [5, 6, 7] and model_input.length == 3


def test_tensor_data_rejects_a_shape_that_does_not_fit():
    with pytest.raises(ValueError, match="shape"):
        types.TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])
