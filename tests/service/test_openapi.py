"""The OpenAPI document: valid OpenAPI 3.1 (openapi-spec-validator), an example for every request and response
body that validates against its own schema and that the live service accepts, the API-key security scheme on the
routes that need the key, the 503s, and the Prometheus content type of /metrics."""

from __future__ import annotations

import time
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from service_harness import SettingsFactory, serving

from service.app import create_app
from service.openapi import EXAMPLES, timed_examples

pytestmark = [pytest.mark.redis]

KEY = "k-openapi-test"


def _document(make_settings: SettingsFactory, **overrides: Any) -> dict[str, Any]:
    return create_app(make_settings(**overrides)).openapi()  # no lifespan needed: routes and models only


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for `schema` whose `#/components/...` refs resolve inside `doc`."""
    resource: Resource[Any] = Resource(contents=doc, specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:polarity", resource)
    return jsonschema.Draft202012Validator(_rebased(schema), registry=registry)


def _rebased(schema: Any) -> Any:
    """`schema` with its document-local refs (#/components/...) pointing into the registered document."""
    if isinstance(schema, dict):
        return {k: ("urn:polarity" + v if k == "$ref" and v.startswith("#/") else _rebased(v))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebased(v) for v in schema]
    return schema


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def test_the_document_is_valid_openapi_and_every_body_has_a_valid_example(make_settings: SettingsFactory) -> None:
    doc = _document(make_settings)
    validate(doc)  # raises on an invalid document
    assert doc["openapi"].startswith("3.1")
    bodies = 0
    for path, method, op in _operations(doc):
        contents = [("request", op["requestBody"]["content"])] if "requestBody" in op else []
        contents += [(f"response {code}", r["content"]) for code, r in op["responses"].items() if "content" in r]
        for where, content in contents:
            for media, entry in content.items():
                if media != "application/json" or not entry.get("schema"):
                    continue
                assert "example" in entry, f"{method.upper()} {path} {where}: no example"
                _validator(doc, entry["schema"]).validate(entry["example"])
                bodies += 1
    assert bodies >= 20
    built_at = doc["components"]["schemas"]["ScoreRequest"]["examples"][0]["request_time"]
    for name, example in timed_examples(built_at).items():  # the component schemas carry the same examples
        schema = doc["components"]["schemas"][name]
        assert schema["examples"] == [example]
        _validator(doc, schema).validate(example)


def test_score_example_has_a_real_request_time(make_settings: SettingsFactory) -> None:
    doc = _document(make_settings)
    example = doc["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert abs(example["request_time"] - time.time()) < 120 and len(example["candidates"]) >= 2  # now, not 0 or 2024
    events = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["example"]["events"]
    assert all(example["request_time"] - 600 < e["timestamp"] < example["request_time"] for e in events)
    assert set(EXAMPLES) == set(timed_examples(time.time()))


def test_security_scheme_is_on_the_routes_that_need_the_key(make_settings: SettingsFactory) -> None:
    doc = _document(make_settings)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                       "description": schemes["ApiKeyHeader"]["description"]}
    assert schemes["BearerAuth"]["type"] == "http" and schemes["BearerAuth"]["scheme"] == "bearer"
    secured = {(p, m) for p, m, op in _operations(doc) if "security" in op}
    assert secured == {("/v1/events", "post"), ("/v1/admin/reload", "post")}
    assert doc["paths"]["/v1/events"]["post"]["security"] == [{"ApiKeyHeader": []}, {"BearerAuth": []}]
    locked = _document(make_settings, api_key=KEY, require_api_key_for_scoring=True)
    assert {(p, m) for p, m, op in _operations(locked) if "security" in op} == secured | {
        ("/v1/score", "post"), ("/v1/score:batch", "post")}


def test_503s_and_the_metrics_content_type_are_documented(make_settings: SettingsFactory) -> None:
    doc = _document(make_settings)
    for path, method in (("/readyz", "get"), ("/v1/events", "post"), ("/v1/score", "post"),
                         ("/v1/score:batch", "post"), ("/v2/health/ready", "get")):
        assert "503" in doc["paths"][path][method]["responses"], path
    assert "Retry-After" in doc["paths"]["/v1/events"]["post"]["responses"]["503"]["description"]
    for path, method, op in _operations(doc):  # validation errors are documented as the boundary sends them
        assert "HTTPValidationError" not in str(op["responses"]), f"{method} {path}"
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert len(metrics) == 1 and next(iter(metrics)).startswith("text/plain; version=")


@pytest.mark.asyncio
async def test_the_examples_are_accepted_by_the_live_service(make_settings: SettingsFactory) -> None:
    async with serving(make_settings(api_key=KEY)) as (app, client):
        doc = app.openapi()
        paths = doc["paths"]

        def example(path: str) -> Any:
            return paths[path]["post"]["requestBody"]["content"]["application/json"]["example"]

        r = await client.post("/v1/events", json=example("/v1/events"), headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json()["rejected"] == 0, r.text
        r = await client.post("/v1/score", json=example("/v1/score"))
        assert r.status_code == 200 and r.json()["history"]["positives"] == 1, r.text  # the click before it
        r = await client.post("/v1/score:batch", json=example("/v1/score:batch"))
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        unauthorised = await client.post("/v1/events", json=example("/v1/events"))
        assert unauthorised.status_code == 401
        for path, method, op in _operations(doc):
            for code in op["responses"]:
                assert code in ("200", "401", "403", "404", "413", "422", "503"), f"{method} {path}: {code}"
