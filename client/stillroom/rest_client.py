"""RestClient: list, inspect, expire, delete and download training runs and checkpoints.

Names follow the Tinker SDK's RestClient. Every method has an `_async` twin. Downloads fetch a
checkpoint as a tar over the server's HTTP port (a short-lived URL from a gRPC call), stream it
to disk with httpx and extract it safely; a progress bar shows when tqdm is installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb
from stillroom.futures import APIFuture, ValueFuture

if TYPE_CHECKING:
    pass

_CHECKPOINT_TYPES: dict[str, types.CheckpointType] = {"weights": "training", "sampler_weights": "sampler",
                                                      "external_weights": "external"}
CHUNK_BYTES = 1 << 20


def _time(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def checkpoint_from_pb(info: pb.CheckpointInfo) -> types.Checkpoint:
    return types.Checkpoint(
        checkpoint_id=f"{info.kind}/{info.name}", checkpoint_type=_CHECKPOINT_TYPES[info.kind],
        time=datetime.fromisoformat(info.created_at), tinker_path=info.path, size_bytes=info.size_bytes,
        expires_at=_time(info.expires_at), training_run_id=info.training_run_id,
        base_model=info.base_model, is_lora=info.is_lora, public=info.published,
        user_metadata=dict(info.user_metadata) or None)


def training_run_from_pb(info: pb.TrainingRunInfo) -> types.TrainingRun:
    return types.TrainingRun(
        training_run_id=info.training_run_id, base_model=info.base_model, is_lora=info.is_lora,
        lora_rank=info.lora_rank if info.is_lora else None, last_request_seq=info.last_request_seq,
        num_trainable_params=info.num_trainable_params, created_at=_time(info.created_at),
        last_checkpoint=(checkpoint_from_pb(info.last_checkpoint)
                         if info.HasField("last_checkpoint") else None),
        last_sampler_checkpoint=(checkpoint_from_pb(info.last_sampler_checkpoint)
                                 if info.HasField("last_sampler_checkpoint") else None),
        user_metadata=dict(info.user_metadata))


def client_session_from_pb(info: pb.ClientSessionInfo) -> types.ClientSession:
    return types.ClientSession(
        session_id=info.session_id, state=info.state,  # pyright: ignore[reportArgumentType]
        end_reason=info.end_reason or None, created_at=_time(info.created_at),
        last_heartbeat_at=_time(info.last_heartbeat_at), ended_at=_time(info.ended_at),
        training_run_ids=list(info.training_run_ids), live_runs=info.live_runs,
        sampler_ids=list(info.sampler_ids), tags=list(info.tags), user_metadata=dict(info.user_metadata))


def _path_of(training_run_id: str, checkpoint_id: str | None) -> str:
    """Tinker's (run, "weights/<name>") pair, or a whole path given alone, as a server path."""
    if checkpoint_id is None:
        return _wire.checkpoint_path(training_run_id)
    return f"stillroom://{training_run_id}/{checkpoint_id}"


class RestClient:
    """Built from a ServiceClient (`service.create_rest_client()`, sharing its connection) or on
    its own, as Tinker builds it: `RestClient(base_url=..., api_key=...)` (else
    STILLROOM_BASE_URL / STILLROOM_API_KEY). Sync methods return a finished APIFuture that also
    reads as its value; `_async` twins return the value."""

    def __init__(self, _holder: Any = None, *, base_url: str | None = None,
                 api_key: str | None = None, tls_root_cert: str | None = None) -> None:
        if _holder is not None:
            self._service = _holder
            self._connection = _holder._connection
            self._owns_connection = False
        else:
            from stillroom._connection import Connection, connection_settings

            self._connection = Connection(*connection_settings(base_url, api_key),
                                          tls_root_cert=tls_root_cert)
            self._owns_connection = True

    def close(self) -> None:
        """Close the connection, if this client made its own."""
        if self._owns_connection:
            self._connection.close()

    def _run(self, coro) -> ValueFuture:
        return ValueFuture(self._connection.run(coro))

    async def _run_async(self, coro):
        return await self._connection.run_async(coro)

    def get_telemetry(self) -> None:
        """Tinker's client telemetry; Stillroom sends none."""
        return None

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        from stillroom.service_client import server_capabilities

        return self._run(server_capabilities(self._connection))

    # ---------------------------------------------------------------- training runs

    async def _list_training_runs(self, limit: int, offset: int) -> types.TrainingRunsResponse:
        reply = await self._connection.call("ListTrainingRuns",
                                            pb.ListTrainingRunsRequest(limit=limit, offset=offset))
        return types.TrainingRunsResponse(
            training_runs=[training_run_from_pb(r) for r in reply.training_runs],
            cursor=types.Cursor(offset=offset, limit=limit, total_count=reply.total_count))

    def list_training_runs(self, limit: int = 20, offset: int = 0, access_scope: str = "owned",
                           project_id: str | None = None) -> APIFuture[types.TrainingRunsResponse]:
        """The caller's training runs, newest first (every scope is the caller's own)."""
        return self._run(self._list_training_runs(limit, offset))

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0, access_scope: str = "owned",
                                       project_id: str | None = None) -> types.TrainingRunsResponse:
        return await self._run_async(self._list_training_runs(limit, offset))

    async def _get_training_run(self, training_run_id: str) -> types.TrainingRun:
        info = await self._connection.call("GetTrainingRun",
                                           pb.GetTrainingRunRequest(training_run_id=training_run_id))
        checkpoints = (await self._list_checkpoints(training_run_id)).checkpoints
        run = training_run_from_pb(info)
        for checkpoint in checkpoints:  # oldest first: the last of each kind wins
            if checkpoint.checkpoint_type == "training":
                run.last_checkpoint = checkpoint
            else:
                run.last_sampler_checkpoint = checkpoint
        return run

    def get_training_run(self, training_run_id: str,
                         access_scope: str = "owned") -> APIFuture[types.TrainingRun]:
        return self._run(self._get_training_run(training_run_id))

    async def get_training_run_async(self, training_run_id: str,
                                     access_scope: str = "owned") -> types.TrainingRun:
        return await self._run_async(self._get_training_run(training_run_id))

    def get_training_run_by_tinker_path(self, tinker_path: str,
                                        access_scope: str = "owned") -> APIFuture[types.TrainingRun]:
        """The training run a checkpoint path (tinker:// or stillroom://) belongs to."""
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return self.get_training_run(parsed.training_run_id)

    async def get_training_run_by_tinker_path_async(self, tinker_path: str,
                                                    access_scope: str = "owned") -> types.TrainingRun:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return await self.get_training_run_async(parsed.training_run_id)

    async def _weights_info(self, path: str) -> types.WeightsInfoResponse:
        info = await self._connection.call("GetWeightsInfo",
                                           pb.CheckpointPathRequest(path=_wire.checkpoint_path(path)))
        return types.WeightsInfoResponse(base_model=info.base_model, is_lora=info.is_lora,
                                         lora_rank=info.lora_rank if info.is_lora else None)

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[types.WeightsInfoResponse]:
        """The base model and LoRA rank behind a checkpoint path: the caller's, or a published one."""
        return self._run(self._weights_info(tinker_path))

    # ---------------------------------------------------------------- checkpoints

    async def _list_checkpoints(self, training_run_id: str) -> types.CheckpointsListResponse:
        reply = await self._connection.call("ListCheckpoints",
                                            pb.ListCheckpointsRequest(training_run_id=training_run_id))
        return types.CheckpointsListResponse(checkpoints=[checkpoint_from_pb(c) for c in reply.checkpoints])

    def list_checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        """One run's checkpoints, oldest first."""
        if not training_run_id:
            raise ValueError("list_checkpoints needs a training_run_id (list_user_checkpoints lists all)")
        return self._run(self._list_checkpoints(training_run_id))

    async def list_checkpoints_async(self, training_run_id: str) -> types.CheckpointsListResponse:
        if not training_run_id:
            raise ValueError("list_checkpoints needs a training_run_id (list_user_checkpoints lists all)")
        return await self._run_async(self._list_checkpoints(training_run_id))

    async def _list_user_checkpoints(self, limit: int, offset: int) -> types.CheckpointsListResponse:
        if limit < 1 or offset < 0:
            raise ValueError(f"list_user_checkpoints: need limit >= 1 and offset >= 0, got {limit}, {offset}")
        every = (await self._list_checkpoints("")).checkpoints
        return types.CheckpointsListResponse(
            checkpoints=every[offset:offset + limit],
            cursor=types.Cursor(offset=offset, limit=limit, total_count=len(every)))

    def list_user_checkpoints(self, limit: int = 100,
                              offset: int = 0) -> APIFuture[types.CheckpointsListResponse]:
        """The caller's checkpoints, newest first, `limit` from `offset`."""
        return self._run(self._list_user_checkpoints(limit, offset))

    async def list_user_checkpoints_async(self, limit: int = 100,
                                          offset: int = 0) -> types.CheckpointsListResponse:
        return await self._run_async(self._list_user_checkpoints(limit, offset))

    async def _delete(self, path: str) -> types.Checkpoint:
        return checkpoint_from_pb(await self._connection.call(
            "DeleteCheckpoint", pb.CheckpointPathRequest(path=_wire.checkpoint_path(path)), timeout=600))

    def delete_checkpoint(self, training_run_id: str,
                          checkpoint_id: str | None = None) -> APIFuture[types.Checkpoint]:
        """Delete a checkpoint's files and record; sampling clients on it stop working.
        Tinker's form names it by run and checkpoint_id ("weights/<name>"); a whole path alone
        also works. The future's value is the deleted checkpoint."""
        return self._run(self._delete(_path_of(training_run_id, checkpoint_id)))

    async def delete_checkpoint_async(self, training_run_id: str,
                                      checkpoint_id: str | None = None) -> types.Checkpoint:
        return await self._run_async(self._delete(_path_of(training_run_id, checkpoint_id)))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[types.Checkpoint]:
        return self._run(self._delete(tinker_path))

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> types.Checkpoint:
        return await self._run_async(self._delete(tinker_path))

    async def _set_ttl(self, path: str, ttl_seconds: int | None) -> types.Checkpoint:
        request = pb.SetCheckpointTtlRequest(path=_wire.checkpoint_path(path))
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        return checkpoint_from_pb(await self._connection.call("SetCheckpointTtl", request))

    def set_checkpoint_ttl(self, path: str, ttl_seconds: int | None) -> APIFuture[types.Checkpoint]:
        """Have the server delete the checkpoint `ttl_seconds` from now (None: keep it forever)."""
        return self._run(self._set_ttl(path, ttl_seconds))

    async def set_checkpoint_ttl_async(self, path: str, ttl_seconds: int | None) -> types.Checkpoint:
        return await self._run_async(self._set_ttl(path, ttl_seconds))

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str,
                                            ttl_seconds: int | None) -> APIFuture[types.Checkpoint]:
        return self._run(self._set_ttl(tinker_path, ttl_seconds))

    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str,
                                                        ttl_seconds: int | None) -> types.Checkpoint:
        return await self._run_async(self._set_ttl(tinker_path, ttl_seconds))

    async def _publish(self, path: str, published: bool) -> types.Checkpoint:
        method = "PublishCheckpoint" if published else "UnpublishCheckpoint"
        return checkpoint_from_pb(await self._connection.call(
            method, pb.CheckpointPathRequest(path=_wire.checkpoint_path(path))))

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[types.Checkpoint]:
        """Let every owner of this server sample, distill from and load the caller's checkpoint
        (read-only: only its owner deletes it, sets its TTL or unpublishes it)."""
        return self._run(self._publish(tinker_path, True))

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> types.Checkpoint:
        return await self._run_async(self._publish(tinker_path, True))

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[types.Checkpoint]:
        """Make a published checkpoint private again; other owners' next calls on it are refused."""
        return self._run(self._publish(tinker_path, False))

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> types.Checkpoint:
        return await self._run_async(self._publish(tinker_path, False))

    # ---------------------------------------------------------------- client sessions

    async def _list_client_sessions(self) -> types.ClientSessionsResponse:
        reply = await self._connection.call("ListClientSessions", pb.ListClientSessionsRequest())
        return types.ClientSessionsResponse(sessions=[client_session_from_pb(s) for s in reply.sessions],
                                            session_timeout_seconds=reply.session_timeout_seconds)

    def list_client_sessions(self) -> APIFuture[types.ClientSessionsResponse]:
        """Your Tinker client sessions on the server, live and ended, oldest first (Stillroom's own
        SDK makes none), with the server's session timeout."""
        return self._run(self._list_client_sessions())

    async def list_client_sessions_async(self) -> types.ClientSessionsResponse:
        return await self._run_async(self._list_client_sessions())

    async def _end_client_session(self, session_id: str) -> types.ClientSession:
        reply = await self._connection.call("EndClientSession",
                                            pb.EndClientSessionRequest(session_id=session_id))
        return client_session_from_pb(reply)

    def end_client_session(self, session_id: str) -> APIFuture[types.ClientSession]:
        """End a client session as its client's finish would: its training runs leave memory (their
        checkpoints stay) and its client's next call says it was ended."""
        return self._run(self._end_client_session(session_id))

    async def end_client_session_async(self, session_id: str) -> types.ClientSession:
        return await self._run_async(self._end_client_session(session_id))

    # ---------------------------------------------------------------- downloads

    async def _archive_url(self, path: str) -> types.CheckpointArchiveUrlResponse:
        reply = await self._connection.call("GetCheckpointArchiveUrl",
                                            pb.CheckpointPathRequest(path=_wire.checkpoint_path(path)))
        host = self._connection.target.rsplit(":", 1)[0] or "127.0.0.1"
        scheme = "https" if self._connection.tls else "http"  # downloads use the gRPC port's TLS
        return types.CheckpointArchiveUrlResponse(
            url=f"{scheme}://{host}:{reply.http_port}{reply.url_path}", expires=_time(reply.expires_at),
            size_bytes=reply.size_bytes)

    def get_checkpoint_archive_url(self, path: str) -> APIFuture[types.CheckpointArchiveUrlResponse]:
        """A short-lived URL that serves the checkpoint as a tar archive."""
        return self._run(self._archive_url(path))

    async def get_checkpoint_archive_url_async(self, path: str) -> types.CheckpointArchiveUrlResponse:
        return await self._run_async(self._archive_url(path))

    def download_checkpoint_archive(self, path: str, dest_dir: str | os.PathLike,
                                    progress: bool = True) -> Path:
        """Download and extract a checkpoint into `dest_dir`; return its folder `dest_dir/<name>`.

        A LoRA sampler checkpoint is a PEFT adapter folder (adapter_config.json,
        adapter_model.safetensors); a full one is a Hugging Face model folder. Either holds
        stillroom_checkpoint.json, which names the base model.
        """
        dest = Path(dest_dir)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        target = dest / name   # the archive's one folder: the name
        # refused before anything is downloaded (a malformed name is the server's to refuse)
        if name not in ("", ".", "..") and target.exists():
            raise FileExistsError(f"{target} already exists; remove it or download elsewhere")
        url = self.get_checkpoint_archive_url(path).result()
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".stillroom-download-", dir=dest) as staging:
            archive = Path(staging) / "archive.tar"
            _fetch(url.url, archive, url.size_bytes, progress, label=path.rsplit("/", 1)[-1],
                   verify=self._connection.tls_root_cert or True)
            return _extract(archive, Path(staging) / "extracted", dest)

    async def download_checkpoint_archive_async(self, path: str, dest_dir: str | os.PathLike,
                                                progress: bool = True) -> Path:
        return await asyncio.to_thread(self.download_checkpoint_archive, path, dest_dir, progress)

    get_checkpoint_archive_url_from_tinker_path = get_checkpoint_archive_url
    get_checkpoint_archive_url_from_tinker_path_async = get_checkpoint_archive_url_async


def _progress_bar(total: int, label: str, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total or None, unit="B", unit_scale=True, desc=label, leave=False)

    class Silent:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    return Silent()


def _fetch(url: str, target: Path, expected: int, progress: bool, label: str,
           verify: bool | str = True) -> None:
    """Stream `url` to `target`, never holding more than a chunk in memory. `verify`: True (the
    system's roots) or the path of a PEM certificate to trust, for https downloads."""
    import ssl

    import httpx

    bar = _progress_bar(expected, label, progress)
    context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(60.0, read=600.0), verify=context) as response:
            if response.status_code == 404:
                from stillroom.errors import NotFoundError

                raise NotFoundError(f"download: {response.read().decode(errors='replace')[:200]}")
            response.raise_for_status()
            with open(target, "wb") as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
    finally:
        bar.close()


def _safe_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's members, refusing links, devices, absolute paths and `..`."""
    members = archive.getmembers()
    for member in members:
        name = PurePosixPath(member.name)
        if (not name.parts or name.is_absolute() or ".." in name.parts
                or member.name.startswith(("/", "\\")) or ":" in name.parts[0]):
            raise ValueError(f"archive member {member.name!r} would land outside the destination")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"archive member {member.name!r} is not a plain file or folder")
    return members


def _extract(archive_path: Path, staging: Path, dest: Path) -> Path:
    """Extract into `staging`, then move the one top-level folder into `dest`."""
    with tarfile.open(archive_path, mode="r:") as archive:
        members = _safe_members(archive)
        tops = {PurePosixPath(m.name).parts[0] for m in members}
        if len(tops) != 1:
            raise ValueError(f"archive should hold one top-level folder, found {sorted(tops)[:5]}")
        kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(staging, members=members, **kwargs)
    top = tops.pop()
    target = dest / top
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or download elsewhere")
    shutil.move(str(staging / top), str(target))
    return target
