"""HTTP routes under ``/dreambooth/v1``: list and create models, start, watch and cancel a training run.

The same router serves the web UI (mounted from ``on_app_started``) and the standalone app. It runs on fastapi
0.94 with pydantic 1 (the web UI's pins) and on current fastapi with pydantic 2: bodies are plain JSON objects,
checked by ``dreambooth.config``. With credentials (the host's ``--api-auth u:p,u2:p2``) every route asks for
HTTP basic authentication exactly like the host's own ``/sdapi/v1`` routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from secrets import compare_digest
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .config import TrainConfig, check_model_name
from .errors import ConfigError, DreamBoothError
from .supervisor import Busy, Supervisor

API_PREFIX = "/dreambooth/v1"
PAGE_PREFIX = "/dreambooth/internal"
"""Routes of the web UI's own pages (like the web UI's ``/internal/*``): outside the API and its --api-auth,
mounted even with --dreambooth-no-api, and telling nothing but a count and a button's id."""
WATCH_LIMIT_S = 25.0
WATCH_STEP_S = 0.25


def parse_credentials(spec: str | None) -> dict[str, str] | None:
    """``"u1:p1,u2:p2"`` (the host's ``--api-auth`` format) → ``{"u1": "p1", "u2": "p2"}``; None when empty."""
    if not spec:
        return None
    credentials = {}
    for pair in spec.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user:
            raise ConfigError(f"API credentials {pair!r} are not 'user:password'.",
                              "Write --api-auth as user:password, several separated by commas.")
        credentials[user] = password
    return credentials


def basic_auth(credentials: dict[str, str]) -> Callable[..., bool]:
    """A dependency that accepts only the given users (constant-time password check), else 401."""

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 (fastapi 0.94 has no Annotated)
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password.encode("utf-8"), expected.encode("utf-8")):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def build_router(supervisor: Supervisor, credentials: dict[str, str] | None = None) -> APIRouter:
    """The routes, bound to one supervisor; protected by basic authentication when ``credentials`` is given."""
    dependencies = [Depends(basic_auth(credentials))] if credentials else []
    router = APIRouter(dependencies=dependencies)

    @router.get("/models")
    def list_models() -> Any:
        """Names of the models (folders with a config.json) and the one training now."""
        return {"models": supervisor.list_models(), "running": supervisor.running_model()}

    @router.post("/models", status_code=201)
    def create_model(body: dict = Body(...)) -> Any:  # noqa: B008
        """Create a model from ``{"name": ..., "source_checkpoint": <a checkpoint title or file>}``."""
        def create() -> Any:
            name, source = _text(body, "name"), _text(body, "source_checkpoint")
            if supervisor.model_dir(name).exists():
                return _error(409, ConfigError(f"A model named {name!r} already exists.", "Pick another name."))
            return supervisor.create_model(name, source).to_dict()
        return _answer(create)

    @router.get("/models/{name}/config")
    def model_config(name: str) -> Any:
        """The model's config.json."""
        return _answer(lambda: _existing(supervisor, name) and supervisor.load_config(name).to_dict())

    @router.get("/models/{name}/checkpoints")
    def model_checkpoints(name: str) -> Any:
        """The model's finished checkpoint files, oldest first."""
        def listing() -> Any:
            _existing(supervisor, name)
            return {"checkpoints": [_describe(p) for p in supervisor.list_checkpoints(name)]}
        return _answer(listing)

    @router.post("/train", status_code=202)
    def train(body: dict = Body(...)) -> Any:  # noqa: B008
        """Start training with a config (the schema of config.json); 409 names the model that trains already."""
        def start() -> Any:
            config = TrainConfig.from_dict(body)
            supervisor.start(config)
            return {"model": config.model_name, "status": supervisor.status().to_dict()}
        return _answer(start)

    @router.get("/status")
    def status() -> Any:
        """Step, loss, ETA, last checkpoint … of the current or last run."""
        return supervisor.status().to_dict()

    @router.post("/cancel", status_code=202)
    def cancel() -> Any:
        """Stop the run after its current step, keeping what it saved."""
        running = supervisor.running_model()
        supervisor.cancel()
        return {"cancelling": running}

    return router


def build_page_router(supervisor: Supervisor) -> APIRouter:
    """``GET /checkpoints?after=N``: a long poll for every open page of the web UI (``javascript/dreambooth.js``).

    Answers ``{"saved": count, "running": bool, "refresh": id}`` at once when the supervisor's count of saved
    checkpoints differs from ``after`` (or ``after`` is absent), else as soon as it does, or after ``wait``
    seconds (at most 25). ``refresh`` is the id of the host's button that re-lists the txt2img dropdown. The
    wait sleeps on the event loop: an idle page costs one request per 25 s and no thread.
    """
    router = APIRouter()

    @router.get("/checkpoints")
    async def watch_checkpoints(after: int | None = None, wait: float = WATCH_LIMIT_S) -> Any:
        """Wait until a checkpoint has been saved since ``after``."""
        deadline = time.monotonic() + max(0.0, min(wait, WATCH_LIMIT_S))
        while after is not None and supervisor.saved_count() == after and time.monotonic() < deadline:
            await asyncio.sleep(WATCH_STEP_S)
        return {"saved": supervisor.saved_count(), "running": supervisor.running_model() is not None,
                "refresh": supervisor.host.checkpoint_refresh_element}

    return router


def mount_page_routes(app: FastAPI, supervisor: Supervisor, prefix: str = PAGE_PREFIX) -> None:
    """Add the pages' routes (:func:`build_page_router`) under ``prefix``."""
    app.include_router(build_page_router(supervisor), prefix=prefix)


def mount(app: FastAPI, supervisor: Supervisor, credentials: dict[str, str] | None = None,
          prefix: str = API_PREFIX) -> None:
    """Add the routes to an app under ``prefix``."""
    app.include_router(build_router(supervisor, credentials), prefix=prefix)


def _answer(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Busy as exc:
        return JSONResponse(status_code=409, content={**_body(exc), "running_model": exc.running_model})
    except FileNotFoundError as exc:
        return JSONResponse(status_code=404, content={"error": "NotFound", "detail": str(exc), "advice": ""})
    except DreamBoothError as exc:
        return _error(400, exc)


def _error(code: int, exc: DreamBoothError) -> JSONResponse:
    return JSONResponse(status_code=code, content=_body(exc))


def _body(exc: DreamBoothError) -> dict[str, str]:
    return {"error": type(exc).__name__, "detail": exc.message, "advice": exc.advice}


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"'{key}' must be text.")
    return value


def _existing(supervisor: Supervisor, name: str) -> bool:
    check_model_name(name)
    if name not in supervisor.list_models():
        raise FileNotFoundError(f"There is no model named {name!r}.")
    return True


def _describe(path: Path) -> dict[str, Any]:
    return {"name": path.name, "path": str(path), "bytes": path.stat().st_size}
