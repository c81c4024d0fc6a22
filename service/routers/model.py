"""GET /v1/model (the served bundle's manifest) and POST /v1/admin/reload (hot swap, API key)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends

from service.disclosure import without_absolute_paths
from service.errors import BundleRejected, Forbidden
from service.runtime import Runtime, get_runtime
from service.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from service.security import require_api_key

router = APIRouter(tags=["model"])
log = logging.getLogger("polarity.service")


@router.get("/v1/model", summary="The manifest of the model being served")
async def get_model(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:  # noqa: B008
    model = runtime.slot.current
    root = runtime.settings.reload_root
    # No absolute paths (the bundle's directory, the training log in the train config): relative to the model dir.
    return without_absolute_paths({"manifest": model.manifest.data, "serving": model.describe()},  # type: ignore[no-any-return]
                                  root=None if root is None else str(root))


def confined_bundle_path(raw: str, root: Path | None) -> Path:
    """The bundle directory `raw` (relative paths are under `root`), refused unless it lies under `root`."""
    if root is None:
        raise Forbidden("hot reload is disabled: set POLARITY_MODEL_DIR")
    # Checked before resolving: a NUL byte makes resolve() raise, and a path of thousands of
    # components costs resolve() quadratic time.
    if "\x00" in raw or len(raw) > 4096:
        raise Forbidden("bundle path must be a directory path under POLARITY_MODEL_DIR (no NUL, <= 4096 chars)")
    path = Path(raw)
    try:
        resolved = (path if path.is_absolute() else root / path).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loop, name too long
        raise Forbidden("bundle path cannot be resolved under the configured model directory") from None
    if resolved != root and root not in resolved.parents:
        raise Forbidden("bundle path must lie under the configured model directory (POLARITY_MODEL_DIR)")
    return resolved


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
               422: {"model": ErrorResponse, "description": "bundle refused; the old model keeps serving"}},
    summary="Swap to another bundle without dropping requests",
)
async def reload_model(body: ReloadRequest, runtime: Runtime = Depends(get_runtime)) -> ReloadResponse:  # noqa: B008
    path = confined_bundle_path(body.bundle, runtime.settings.reload_root)
    try:
        old, new = await runtime.slot.reload(path)
    except BundleRejected as exc:
        runtime.metrics.reloads.labels(outcome="failure").inc()
        log.warning("model reload of %s refused: %s; still serving %s", path, exc.message,
                    runtime.slot.current.version)
        raise
    runtime.metrics.reloads.labels(outcome="success").inc()
    b = new.backend
    runtime.metrics.set_model(name=new.manifest.name, version=new.version, arch=new.manifest.arch,
                              provider=b.provider, kernel=b.kernel, requested=runtime.settings.device)
    log.info("model reloaded: %s -> %s", old.version, new.version)
    return ReloadResponse(model_version=new.version, previous_version=old.version, name=new.manifest.name)
