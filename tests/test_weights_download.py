"""Tinker's weight downloads from Stillroom: `save_weights_external` and its signed URLs, driven by
the official `tinker checkpoint download` CLI (unchanged, in a subprocess) and by tinker-cookbook's
`weights.download` + `build_hf_model`. The files load in transformers + PEFT with the server's
logprobs, are laid out as vLLM's and SGLang's LoRA loaders read adapters, and the URLs are signed,
expire, and serve their owner only."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from stillroom_server.store import keys

from conftest import TINY
from helpers import encode_line, official_cli

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
os.environ.setdefault("TINKER_TELEMETRY", "0")
pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
TEXT = "export me, then serve me"


@pytest.fixture(scope="module")
def trained(server, tokenizer):
    """A LoRA run trained over Tinker's HTTP API: its saved state and the server's logprobs of TEXT."""
    T = tinker.types
    client = tinker.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = client.create_lora_training_client(TINY, rank=4, seed=7).result()
    tokens = encode_line(tokenizer, TEXT)
    datum = T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for _ in range(3):
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(T.AdamParams(learning_rate=2e-2)).result()
    state = trainer.save_state("download-state").result().path
    sampler = trainer.save_weights_and_get_sampling_client()
    expected = sampler.compute_logprobs(T.ModelInput.from_ints(tokens)).result()
    yield trainer, state, tokens, expected
    client.close("success").result()


def _base_dir(server) -> Path:
    return server.config.data_dir / "models" / TINY


def _logprobs(model, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits.float()
    picked = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(tokens[1:])[:, None])
    return picked.squeeze(-1).tolist()


def _gap(expected: list, local: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(expected[1:], local, strict=True))


def _check_serving_layout(folder: Path) -> None:
    """The rules vLLM's and SGLang's LoRA loaders apply to a PEFT adapter folder (as read from their
    sources: vllm/lora/{peft_helper,utils,lora_model}.py, sglang/srt/lora/{utils,lora}.py)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    # PEFTHelper: r, lora_alpha and target_modules are required; modules_to_save and DoRA refused
    assert config["peft_type"] == "LORA" and config["r"] > 0 and config["lora_alpha"] > 0
    assert isinstance(config["target_modules"], list)  # SGLang takes a string only as "all(-linear)"
    assert not config.get("modules_to_save") and not config.get("use_dora") and config["bias"] == "none"
    assert config["base_model_name_or_path"] == TINY  # the base model, not a folder on the server
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    # parse_fine_tuned_lora_name: base_model.model.<module>.lora_A|lora_B.weight
    modules = {}
    for name in names:
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", name)
        assert match, name
        modules.setdefault(match[1], set()).add(match[2])
    assert all(parts == {"lora_A", "lora_B"} for parts in modules.values())
    suffixes = {m.rsplit(".", 1)[-1] for m in modules}
    # vLLM expects the model's linear layers' names (packed qkv_proj / gate_up_proj expanded) and its
    # embedding_modules (embed_tokens, lm_head); SGLang normalizes q/k/v and gate/up to the packed names
    assert suffixes <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "lm_head", "embed_tokens"}
    assert suffixes <= set(config["target_modules"])
    # the char presets tie the unembedding to the embedding: no lm_head adapter (neither loader
    # adapts a tied lm_head apart from embed_tokens; an untied model's would be base_model.model.lm_head)
    assert "lm_head" not in suffixes
    for module in modules:  # SGLang stacks q/k/v and gate/up per layer: all or none of each group
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            stem, _, last = module.rpartition(".")
            if last in group:
                assert all(f"{stem}.{other}" in modules for other in group), module


def test_the_official_cli_downloads_a_stillroom_checkpoint(server, trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, state, tokens, expected = trained
    env = os.environ | {"TINKER_BASE_URL": server.http_url, "TINKER_API_KEY": server.local_api_key,
                        "TINKER_TELEMETRY": "0"}
    done = official_cli(["checkpoint", "download", state, "--output", str(tmp_path)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = tmp_path / state.replace("tinker://", "").replace("/", "_")
    assert {f.name for f in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    _check_serving_layout(folder)
    base = AutoModelForCausalLM.from_pretrained(_base_dir(server), dtype=torch.float32).eval()
    assert _gap(expected, _logprobs(base, tokens)) > 1e-3  # the adapter matters
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    assert _gap(expected, _logprobs(model, tokens)) <= TOLERANCE
    # the CLI's temporary export was deleted after the download
    rest = tinker.RestClient(base_url=server.http_url, api_key=server.local_api_key)
    listed = rest.list_user_checkpoints(limit=1000).result().checkpoints
    assert not [c for c in listed if c.checkpoint_type == "external"
                and (c.user_metadata or {}).get("created_by") == "tinker checkpoint download"]


def test_the_cookbook_downloads_and_merges_a_stillroom_run(server, trained, tmp_path, monkeypatch):
    from tinker_cookbook import weights
    from transformers import AutoModelForCausalLM

    _, state, tokens, expected = trained
    monkeypatch.setenv("TINKER_API_KEY", server.local_api_key)
    # a training state: exported encrypted to a key the cookbook makes, downloaded and decrypted
    adapter = weights.download(tinker_path=state, output_dir=str(tmp_path / "adapter"),
                               base_url=server.http_url)
    assert {f.name for f in Path(adapter).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    _check_serving_layout(Path(adapter))
    weights.build_hf_model(base_model=str(_base_dir(server)), adapter_path=adapter,
                           output_path=str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert _gap(expected, _logprobs(merged, tokens)) <= TOLERANCE


def _signer(server) -> Any:
    """The running server's URL signer (the route's bound method's object)."""
    for route in server.http.config.app.routes:
        owner = getattr(route.endpoint, "__self__", None)
        if type(owner).__name__ == "SignedUrls":
            return owner
    raise AssertionError("no signed-URL route")


def test_download_urls_are_signed_expire_and_serve_their_owner_only(server, service, trained):
    import httpx

    trainer = trained[0]
    export = trainer.save_weights_external("url-rules").result().path
    assert export.startswith("tinker://") and "/external_weights/url-rules" in export
    rest = tinker.RestClient(base_url=server.http_url, api_key=server.local_api_key)
    signed = rest.get_external_weights_urls(export).result()
    assert set(signed.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    url = signed.urls["adapter_model.safetensors"]
    assert httpx.get(url).status_code == 200  # a signed URL needs no key (plain urllib fetches it)
    assert httpx.get(url, headers={"X-API-Key": server.local_api_key}).status_code == 200

    _, other_key = keys.create_key(server.store, "download-other", "signed URL test")
    assert httpx.get(url, headers={"X-API-Key": other_key}).status_code == 403
    assert httpx.get(url, headers={"X-API-Key": "tml-not-a-key"}).status_code == 403
    signature = url.rsplit("=", 1)[1]
    forged = url[:-1] + ("0" if signature[-1] != "0" else "1")
    expires = int(url.split("expires=")[1].split("&")[0])
    for bad in (forged, url.replace("adapter_model.safetensors", "adapter_config.json"),
                url.replace(f"expires={expires}", f"expires={expires + 3600}"),
                url.replace("url-rules", "other-name"), url.split("?")[0],
                url.replace("adapter_model.safetensors", "..%2F..%2Fweights")):
        assert httpx.get(bad).status_code in (403, 404), bad
    other = tinker.RestClient(base_url=server.http_url, api_key=other_key)
    with pytest.raises(tinker.NotFoundError):  # another owner cannot sign URLs for it
        other.get_external_weights_urls(export).result()
    with pytest.raises(tinker.BadRequestError, match="external weights"):  # downloads only
        rest.publish_checkpoint_from_tinker_path(export).result()

    signer = _signer(server)
    seconds, signer.seconds = signer.seconds, -1.0
    try:
        stale = rest.get_external_weights_urls(export).result().urls["adapter_config.json"]
    finally:
        signer.seconds = seconds
    answer = httpx.get(stale)
    assert answer.status_code == 403 and "expired" in answer.text

    listed = {c.tinker_path: c.checkpoint_type
              for c in service.create_rest_client().list_user_checkpoints(limit=1000).result().checkpoints}
    assert listed[export.replace("tinker://", "stillroom://")] == "external"  # Stillroom's SDK too

    rest.delete_checkpoint_from_tinker_path(export).result()
    assert httpx.get(url).status_code in (403, 404)  # a deleted export's URLs stop working

    # a malformed age recipient fails the request (its number used up), and the run goes on
    with pytest.raises(tinker.RequestFailedError, match="age_encryption_recipients"):
        trainer.save_weights_external("bad-key", age_encryption_recipients=["age1-not-a-key"]).result()
    assert trainer.save_weights_external("after-bad-key").result().path.endswith("/after-bad-key")
