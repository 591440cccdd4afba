"""No code path loads a pickle from a file or the network: the source uses no unpickling API, and
a model directory holding only a pickled checkpoint is refused rather than loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import stillroom

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
UNPICKLING = re.compile(r"\bpickle\.loads?\(|\btorch\.load\(|\bnp\.load\(|\bjoblib\.load\(|\bdill\.|"
                        r"\bmarshal\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False")


def test_the_source_has_no_unpickling_calls():
    offenders = [f"{path.relative_to(ROOT)}:{n}"
                 for folder in ("client", "server", "cookbook", "scripts", "alembic")
                 for path in (ROOT / folder).rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if UNPICKLING.search(line)]
    assert not offenders, offenders


def test_a_pickled_model_directory_is_refused(service, server, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    service.create_sampling_client(base_model=TINY)  # the preset is written on first use
    model = AutoModelForCausalLM.from_pretrained(server.config.data_dir / "models" / TINY)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # an old-style, pickled checkpoint
    assert (tmp_path / "pytorch_model.bin").exists() and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises((stillroom.BadRequestError, stillroom.NotFoundError), match="base_model"):
        service.create_sampling_client(base_model=str(tmp_path))
