"""Downloads: a checkpoint comes back as a tar over the server's HTTP port and extracts into a
folder that PEFT / transformers load to the server's logprobs; LoRA adapters merge into a plain
model; unsafe archives are refused; the `stillroom` command drives it all."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
import torch

from stillroom import types
from stillroom.cli import main as cli
from stillroom.export import merge_lora_adapter
from stillroom.rest_client import _extract

from conftest import TINY
from helpers import encode_line, sft_datum, train_steps


def _local_logprobs(model, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(tokens[1:])[:, None])
    return logprobs.squeeze(-1).tolist()


def _gap(server_logprobs: list, local: list[float]) -> float:
    """The server's logprobs against a local transformers forward of the same weights: other summation
    orders only, a few ulps apart (~5e-7 each at |logprob| ~5), so 1e-5 (20 ulps) below; an adapter left
    out moves them by > 1e-3."""
    return max(abs(a - b) for a, b in zip(server_logprobs[1:], local))


@pytest.fixture(scope="module")
def trained_lora(service, tokenizer):
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    train_steps(trainer, [sft_datum(encode_line(tokenizer, "download me, please"))], 3, 2e-2)
    return trainer.save_weights_and_get_sampling_client("for-download")


@pytest.mark.slow
def test_lora_download_is_a_peft_adapter_with_the_servers_logprobs(service, server, tokenizer,
                                                                   trained_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = service.create_rest_client().download_checkpoint_archive(trained_lora.model_path, tmp_path)
    assert folder == tmp_path / "for-download"
    assert {"adapter_config.json", "adapter_model.safetensors", "stillroom_checkpoint.json"} <= \
        {f.name for f in folder.iterdir()}
    assert json.loads((folder / "stillroom_checkpoint.json").read_text())["base_model"] == TINY

    tokens = encode_line(tokenizer, "download me, please")
    expected = trained_lora.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    base_dir = server.config.data_dir / "models" / TINY
    base_only = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert _gap(expected, _local_logprobs(base_only, tokens)) > 1e-3  # the adapter matters
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      str(folder)).eval()
    assert _gap(expected, _local_logprobs(model, tokens)) <= 1e-5

    merged_dir = merge_lora_adapter(folder, tmp_path / "merged", base_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert _gap(expected, _local_logprobs(merged, tokens)) <= 1e-5


def test_full_download_is_a_hugging_face_model(service, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = service.create_full_training_client(TINY, seed=0)
    train_steps(trainer, [sft_datum(encode_line(tokenizer, "full weights"))], 1, 1e-2)
    sampler = trainer.save_weights_and_get_sampling_client("full-download")
    folder = asyncio.run(service.create_rest_client().download_checkpoint_archive_async(
        sampler.model_path, tmp_path, progress=False))
    tokens = encode_line(tokenizer, "full weights")
    expected = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert _gap(expected, _local_logprobs(model, tokens)) <= 1e-5


def test_download_urls_need_a_valid_token(service, trained_lora, tmp_path):
    rest = service.create_rest_client()
    url = rest.get_checkpoint_archive_url(trained_lora.model_path).url
    assert httpx.get(url + "x").status_code == 404
    assert httpx.get(url.rsplit("/", 1)[0] + "/../../etc/passwd").status_code == 404
    response = httpx.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        assert all(name.startswith("for-download/") for name in archive.getnames())
    rest.download_checkpoint_archive(trained_lora.model_path, tmp_path, progress=False)
    with pytest.raises(FileExistsError):  # never overwrites what is there
        rest.download_checkpoint_archive(trained_lora.model_path, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["for-download"]  # no staging left behind


def test_a_download_into_a_taken_folder_is_refused_before_it_starts(service, server, trained_lora, tmp_path,
                                                                    monkeypatch):
    from stillroom import rest_client

    def fetch(*args, **kwargs):
        raise AssertionError("downloaded before refusing")

    monkeypatch.setattr(rest_client, "_fetch", fetch)
    (tmp_path / "for-download").mkdir()
    with pytest.raises(FileExistsError, match="for-download already exists"):
        service.create_rest_client().download_checkpoint_archive(trained_lora.model_path, tmp_path)
    url = ["--base-url", server.address, "--api-key", server.local_api_key]
    with pytest.raises(SystemExit, match="for-download already exists; remove it or download elsewhere"):
        cli(["checkpoints", "download", trained_lora.model_path, str(tmp_path), *url])


def _tar(tmp_path, build) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as archive:
        build(archive)
    return path


def _add(archive, name: str, data: bytes = b"x", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("member", [
    dict(name="ok/../../escape.txt"), dict(name="/tmp/absolute.txt"),
    dict(name="ok/link", kind=tarfile.SYMTYPE, link="/etc/passwd"),
    dict(name="ok/hard", kind=tarfile.LNKTYPE, link="../../etc/passwd"),
])
def test_unsafe_archives_are_refused_and_write_nothing(tmp_path, member):
    archive = _tar(tmp_path, lambda a: (_add(a, "ok/file.txt"), _add(a, **member)))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ValueError):
        _extract(archive, tmp_path / "staging", dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_the_stillroom_command_lists_downloads_and_deletes(service, server, tokenizer, tmp_path, capsys):
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    path = trainer.save_weights_for_sampler("cli-made").result().path
    url = ["--base-url", server.address, "--api-key", server.local_api_key]

    cli(["runs", "list", "--limit", "1000", *url])
    assert trainer.training_run_id in capsys.readouterr().out
    cli(["checkpoints", "list", trainer.training_run_id, *url])
    assert path in capsys.readouterr().out
    cli(["checkpoints", "download", path, str(tmp_path / "dl"), *url])
    assert (tmp_path / "dl" / "cli-made" / "adapter_config.json").exists()
    capsys.readouterr()
    base = str(server.config.data_dir / "models" / TINY)
    cli(["checkpoints", "export", path, str(tmp_path / "ex"), "--merge", "--base", base, *url])
    assert (tmp_path / "ex" / "cli-made-merged" / "config.json").exists()
    cli(["checkpoints", "delete", path, *url])
    assert "deleted" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="NOT_FOUND"):
        cli(["checkpoints", "delete", path, *url])
    with pytest.raises(SystemExit, match="INVALID_ARGUMENT"):
        cli(["checkpoints", "download", "stillroom://../x/weights/y", str(tmp_path), *url])
