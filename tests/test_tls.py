"""Optional TLS: with a certificate and key the server speaks only TLS on its gRPC port and its
download port; an SDK client that trusts the certificate works, a plain one does not."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import stillroom
from stillroom_server.app import StillroomServer
from stillroom_server.config import ServerConfig

from conftest import TINY


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


@pytest.mark.slow   # a server start with its engine process
def test_a_tls_server_serves_trusting_clients_only(tmp_path, certificate):
    cert, key = certificate
    config = ServerConfig(data_dir=tmp_path / "data", host="127.0.0.1", port=0, tls_cert=cert, tls_key=key)
    with StillroomServer(config) as server:
        with stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key,
                                     tls_root_cert=str(cert)) as client:
            assert client.get_server_capabilities().supported_models
            trainer = client.create_lora_training_client(TINY, rank=4, seed=0)
            path = trainer.save_weights_for_sampler("over-tls").result().path
            folder = client.create_rest_client().download_checkpoint_archive(path, tmp_path / "dl")
            assert (folder / "adapter_model.safetensors").exists()
        with stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as plain:
            plain._connection.max_retries = 0
            with pytest.raises(stillroom.APIConnectionError):
                plain.get_server_capabilities()


def test_tls_needs_both_files(tmp_path, certificate):
    with pytest.raises(ValueError, match="give both files or neither"):
        ServerConfig(data_dir=tmp_path, tls_cert=certificate[0])
