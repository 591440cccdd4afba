"""The Tinker-compatible HTTP app: every route, each to its handler in app.py (Tinker's API), the
OpenAI-compatible API (openai_api.py) or the console (console.py), which build on app.py. This
module only lists them: it is the one place all three meet, so none of them imports another's
importer.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route

from stillroom_server.http_api import archives, console, openai_api, weights_urls
from stillroom_server.http_api.app import TinkerApi, endpoint, not_offered


def build_app(api: TinkerApi) -> Starlette:
    v1 = "/api/v1"
    routes = [(f"{v1}/{path}", name, methods) for path, name, methods in [
        ("client/config", "client_config", ["POST"]),
        ("client/dynamic_config", "dynamic_config", ["POST"]),
        ("create_session", "create_session", ["POST"]),
        ("session_heartbeat", "heartbeat", ["POST"]),
        ("sessions/{session_id}/finish", "finish_session", ["POST"]),
        ("telemetry", "telemetry", ["POST"]),
        ("get_server_capabilities", "capabilities", ["GET"]),
        ("create_model", "create_model", ["POST"]),
        ("get_info", "get_info", ["POST"]),
        ("unload_model", "unload_model", ["POST"]),
        ("forward_backward", "forward_backward", ["POST"]),
        ("forward", "forward_backward", ["POST"]),
        ("optim_step", "optim_step", ["POST"]),
        ("save_weights", "save_weights", ["POST"]),
        ("save_weights_for_sampler", "save_weights_for_sampler", ["POST"]),
        ("load_weights", "load_weights", ["POST"]),
        ("create_sampling_session", "create_sampling_session", ["POST"]),
        ("samplers/{sampler_id}", "get_sampler", ["GET"]),
        ("asample", "asample", ["POST"]),
        ("retrieve_future", "retrieve_future", ["POST"]),
        ("training_runs", "list_training_runs", ["GET"]),
        ("training_runs/{run_id}", "get_training_run", ["GET"]),
        ("training_runs/{run_id}/checkpoints", "list_checkpoints", ["GET"]),
        ("checkpoints", "list_checkpoints", ["GET"]),
        ("weights_info", "weights_info", ["POST"]),
        ("sessions", "list_sessions", ["GET"]),
        ("sessions/{session_id}", "get_session", ["GET"]),
    ]]
    table = [Route(path, endpoint(api, getattr(api, name)), methods=methods)
             for path, name, methods in routes]
    checkpoint = f"{v1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}"
    table += [
        Route(checkpoint + "/publish", endpoint(api, api.publish_checkpoint), methods=["POST", "DELETE"]),
        Route(checkpoint + "/ttl", endpoint(api, api.set_checkpoint_ttl), methods=["PUT"]),
        Route(checkpoint + "/external_weights_urls", endpoint(api, api.external_weights_urls),
              methods=["GET"]),
        Route(checkpoint, endpoint(api, api.delete_checkpoint), methods=["DELETE"]),
        Route(f"{v1}/save_weights_external", endpoint(api, api.save_weights_external), methods=["POST"]),
        Route(f"{v1}/create_custom_loss", not_offered("custom_loss"), methods=["POST"]),
        Route(f"{v1}/copy_weights", not_offered("copy_weights"), methods=["POST"]),
        Route(f"{v1}/sessions/{{session_id}}/project", not_offered("projects"), methods=["PUT"]),
        Route(f"{v1}/sessions/{{session_id}}/trace_export", endpoint(api, api.trace_export), methods=["GET"]),
        Route("/traces/{token}", api.trace_download, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route(f"{v1}/audit", not_offered("audit"), methods=["GET"]),
        Route(f"{v1}/billing/{{rest:path}}", not_offered("billing"), methods=["GET"]),
        Route(f"{v1}/healthz", api.healthz, methods=["GET"]),
        archives.route(api.archives),
        Route(weights_urls.PREFIX + "/{run_id}/{name}/{file}", api.weights_urls.download, methods=["GET"]),
    ]
    table += openai_api.routes(api)  # the OpenAI-compatible API under /oai/api/v1
    table += console.routes(api)  # the web console at /console/, its JSON routes under /api/v1/console
    return Starlette(routes=table)

