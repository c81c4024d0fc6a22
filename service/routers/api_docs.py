"""GET /docs: Swagger UI served from this process, so it works on a network without internet access.

FastAPI's own /docs page loads Swagger UI from a CDN; this one serves the assets of the `swagger-ui-bundle-v2`
wheel (Swagger UI 5, which reads OpenAPI 3.1), a dependency in pyproject.toml: installed with the package,
never fetched at run time. ReDoc (CDN only) is not offered.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"

router = APIRouter(include_in_schema=False)


def swagger_ui_assets() -> Path:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css (from the swagger-ui-bundle-v2 wheel)."""
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


@router.get(DOCS_PATH, response_class=HTMLResponse)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="Polarity scoring service: API docs",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
    )


def mount_api_docs(app: FastAPI) -> None:
    """The /docs page and its static assets on `app` (create the app with docs_url=None, redoc_url=None)."""
    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_assets()), name="swagger-ui-assets")
