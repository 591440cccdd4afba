"""An engine process: the engine and its scheduler, driven by the server over one link.

`python -m stillroom_server.engine.process.child --connect HOST:PORT --name NAME`, with the link's
token in STILLROOM_ENGINE_TOKEN (the server starts its own engines this way; `stillroom engine`
starts one on another machine). It dials the server, proves it knows the token, takes its
settings, builds the engine (in-process models, or the sharded back end over its own workers),
then runs what the server submits and sends back each result as it finishes, with its queue
wait and compute time, and its facts (runs, memory, counters) once a second.

If the server goes away the process ends: an engine never outlives the server that gave it work.
Knows the protocol and the engine, not owners, keys or request numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stillroom_server.engine import protocol
from stillroom_server.engine.process.link import Link, LinkClosed, proof

logger = logging.getLogger("stillroom.engine")
FACTS_SECONDS = 1.0
REFUSED = 3          # the exit status of an engine the server refused: starting it again cannot help
TOKEN_VARIABLE = "STILLROOM_ENGINE_TOKEN"


def connect(address: str, name: str, token: str, timeout: float = 30.0) -> tuple[Link, dict[str, Any]]:
    """Dial the server, answer its challenge; return the link and the settings it sent."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    link = Link(sock)
    challenge = link.recv()
    link.send({"op": "hello", "version": protocol.VERSION, "name": name, "pid": os.getpid(),
               "host": socket.gethostname(), "proof": proof(token, str(challenge.get("nonce", "")))})
    answer = link.recv()
    if answer.get("op") != "welcome":
        print(f"stillroom engine: the server at {address} refused this engine: "
              f"{answer.get('why', 'no reason given')}", file=sys.stderr)
        sys.exit(REFUSED)
    sock.settimeout(None)
    link.local = bool(answer["settings"].get("local")) and Path("/dev/shm").is_dir()
    return link, answer["settings"]


def build(settings: dict[str, Any]):
    """The engine the settings describe, and the scheduler that runs its jobs."""
    from stillroom_server.engine.backend import make_engine
    from stillroom_server.engine.runtime import resources
    from stillroom_server.engine.runtime.scheduler import Scheduler

    resources.choose_threads(settings.get("threads"))
    engine = make_engine(
        Path(settings["data_dir"]), settings.get("workers", 1), settings.get("device", "cpu"),
        settings.get("max_num_samples", 128),
        {k: Path(v) for k, v in settings.get("local_models", {}).items()},
        settings.get("dtype", "auto"), settings.get("threads"), settings.get("log_level", "INFO"),
        settings.get("worker_listen"), settings.get("batch_invariant", False),
        run_memory_bytes=settings.get("run_memory_bytes"), spill_dir=Path(settings["spill_dir"]),
        adopt_spill=settings.get("adopt_spill", False), owns_data_dir=False)
    return engine, Scheduler(engine.streams())


def serve(link: Link, settings: dict[str, Any]) -> None:
    engine, scheduler = build(settings)
    link.send({"op": "ready", "run_memory_bytes": engine.run_memory_bytes,
               "max_num_samples": engine.max_num_samples})
    logger.info("engine %s ready (pid %d): %s", settings.get("name"), os.getpid(),
                ", ".join(settings.get("models") or ["every model not placed elsewhere"]))
    stopping = threading.Event()
    threading.Thread(target=_report_facts, args=(link, engine, scheduler, stopping), daemon=True,
                     name="stillroom-engine-facts").start()
    try:
        while True:
            message = link.recv()
            if message["op"] == "submit":
                _submit(link, engine, scheduler, message)
            elif message["op"] == "stop":
                break
    except LinkClosed:
        logger.warning("the server closed the link: stopping this engine")
        stopping.set()
        os._exit(0)   # the server is gone: nobody is left to take results
    stopping.set()
    scheduler.stop()
    engine.shutdown()
    link.close()


def _submit(link: Link, engine, scheduler, message: dict[str, Any]) -> None:
    job_id, kind, command = message["job"], message["kind"], message["command"]
    holder: list = []

    def done(result: Any, error: BaseException | None) -> None:
        job = holder[0]
        finished = time.monotonic()
        started = job.started_at if job.started_at is not None else finished
        reply = {"op": "done", "job": job_id, "queued": started - job.enqueued_at,
                 "compute": finished - started}
        reply |= {"error": error} if error is not None else {"result": result}
        reply["stats"] = dataclasses.asdict(engine.stats)   # the counters as of this result
        if not isinstance(command, protocol.BATCHED):   # runs came or went: the server's facts follow
            reply["facts"] = engine.facts()
        try:
            link.send(reply)
        except LinkClosed:
            pass
        except Exception as failure:  # noqa: BLE001 - a result the wire cannot carry fails its request
            logger.exception("the result of a %s job could not be sent", kind)
            link.send({"op": "done", "job": job_id, "queued": 0.0, "compute": 0.0,
                       "error": RuntimeError(f"its result could not be sent: {failure}")})

    try:
        job = protocol.engine_job(engine, command, kind, message["lane"], done)
    except Exception as error:  # noqa: BLE001 - a command this engine cannot run fails alone
        link.send({"op": "done", "job": job_id, "queued": 0.0, "compute": 0.0, "error": error})
        return
    holder.append(job)
    scheduler.submit(job)


def _report_facts(link: Link, engine, scheduler, stopping: threading.Event) -> None:
    while not stopping.wait(FACTS_SECONDS):
        try:
            link.send({"op": "facts", "facts": engine.facts(), "stats": dataclasses.asdict(engine.stats),
                       "queued": dict(scheduler.queued_by_kind())})
        except LinkClosed:
            return
        except Exception:  # noqa: BLE001 - facts are best effort
            logger.exception("facts could not be sent")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stillroom-engine", description="An engine process")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the server's engine listener")
    parser.add_argument("--name", required=True, help="the engine's name in the server's placement")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [engine {args.name}] %(name)s: %(message)s")
    token = os.environ.get(TOKEN_VARIABLE, "")
    if not token:
        raise SystemExit(f"stillroom engine: set {TOKEN_VARIABLE} (the server's engine token)")
    link, settings = connect(args.connect, args.name, token)
    serve(link, settings)


if __name__ == "__main__":
    main()
