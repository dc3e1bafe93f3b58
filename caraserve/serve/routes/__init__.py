"""The HTTP routes of the OpenAI-compatible API, one module per concern, each over the service
layer (caraserve.serve.service.Service) found at `app.state.service`: the plain server and the
Ray ingress mount the same routes over their own service."""

from fastapi import FastAPI

from caraserve.serve.routes import admin, completions, models, ops


def mount(app: FastAPI, service) -> None:
    app.state.service = service
    for module in (completions, models, admin, ops):
        app.include_router(module.router)
