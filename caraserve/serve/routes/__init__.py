"""The HTTP routes of the OpenAI-compatible API, one module per concern, each over the service
layer (caraserve.serve.service.Service) found at `app.state.service`: the plain server and the
Ray ingress mount the same routes over their own service."""

from fastapi import FastAPI

from caraserve.config import ServerConfig
from caraserve.serve.http import GENERATION_PATHS, Guard, install_error_handlers
from caraserve.serve.routes import admin, completions, models, ops


def guarded_app(service, server: ServerConfig, title: str = "CaraServe", lifespan=None) -> Guard:
    """The API's routes over a service (caraserve.serve.service.Service), errors as OpenAI JSON,
    keys, requests at once and body size checked first. Imports no torch: the Ray ingress builds its app with it."""
    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.state.service = service
    for module in (completions, models, admin, ops):
        app.include_router(module.router)

    def overloaded(path: str) -> None:
        if path in GENERATION_PATHS and hasattr(service, "count_rejection"):
            service.count_rejection("concurrency_limit")

    return Guard(app, server.api_key, server.max_body_bytes, server.admin_api_key, server.allow_runtime_lora,
                 server.limit_concurrency, overloaded)
