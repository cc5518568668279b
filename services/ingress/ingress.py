"""The HTTP ingress: the FastAPI app (one router per resource) and its Ray Serve deployment.

Routes (OpenAPI at /docs):
  POST   /v1/pseudo-labels      a NIfTI volume or a .npy batch of slices → label map (same format) + confidence
  POST   /v1/segment            one image + explicit prompts (points, box, mask) + a class → mask + confidence
  GET    /v1/templates          the template bank: version, classes, exemplars
  POST   /v1/templates          add a labeled exemplar (image + label + class table)
  DELETE /v1/templates/{id}     remove an exemplar
  GET    /v1/info               model, bank version, classes, device, replica, counters
  POST/GET/DELETE /v1/jobs…     labeling jobs over a dataset under data_root (routes/jobs.py)
  GET/POST /v1/jobs/{id}/cases… the review of a job's labels (routes/review.py), the page at /ui/
  GET    /healthz, /readyz      liveness; readiness (a warmed-up replica answered)
  /info/, /infer/{model}, /datastore/…, /activelearning/{strategy}, /train/, /auth/
                                MONAI Label's dialect over the same replicas (routes/monailabel.py)
  GET    /metrics               Prometheus text format

Responses that carry an array are `multipart/mixed`: first a JSON part (confidence, versions, shape),
then the array as a file part (`.nii.gz`, `.nii` or `.npy`, like the input). Every input error is a 4xx
whose `detail` names the problem; with `VESSA_API_TOKEN` set, every route but /healthz and /readyz
needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from ray import serve

from services.ingress.errors import install_error_handlers
from services.ingress.middleware import GuardMiddleware
from services.ingress.routes import jobs, monailabel, pseudo_labels, review, segment, system, templates, ui
from services.ingress.settings import ApiSettings
from services.ingress.state import IngressState

ROUTERS = (pseudo_labels, segment, templates, system, jobs, review, ui, monailabel)


def create_app(state: IngressState | None = None) -> FastAPI:
    """The FastAPI app over `state` (default: settings from the environment, no assistant connected)."""
    state = state or IngressState()
    app = FastAPI(
        title="VESSA",
        version="0.1.0",
        description="Pseudo-labels for semi-supervised medical image segmentation, from a reference-guided "
        "foundation model. Array responses are multipart/mixed: a JSON part, then the file.",
        # an API answers for the paths it documents: no 307 to another route (DELETE /v1/templates/%2F
        # would otherwise be redirected to /v1/templates), so an unknown path is a plain 404
        redirect_slashes=False,
    )
    app.state.vessa = state
    app.add_middleware(GuardMiddleware, settings=state.settings)
    install_error_handlers(app)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        state.metrics.observe(request.url.path, response.status_code, time.perf_counter() - t0)
        return response

    for module in ROUTERS:
        app.include_router(module.router)
    return app


@serve.deployment(name="VessaIngress", max_ongoing_requests=128, max_queued_requests=512)
@serve.ingress()
class VessaIngress:
    """The app above, served by Ray Serve: each replica builds its own app over its own state."""

    def __init__(self, assistant, settings: dict | None = None):
        self.state = IngressState(settings=ApiSettings(**(settings or {})), handle=assistant)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.state)
