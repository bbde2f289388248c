"""/openapi.json: a valid OpenAPI document (openapi-spec-validator) that describes every
public endpoint with request and response schemas, and whose schemas fit what the server
really answers (checked with openapi-schema-validator against live responses)."""
import json
import re

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

import iflow2api
from helpers import http

PUBLIC = {
    ("post", "/v1/chat/completions"), ("post", "/v1/messages"), ("post", "/v1/messages/count_tokens"),
    ("get", "/v1/models"), ("get", "/v1/models/{model_id}"), ("get", "/health"),
}
CHAT = {"model": "glm-5", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "glm-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def document(server):
    status, headers, body = http(server, "GET", "/openapi.json")
    assert status == 200
    assert headers["content-type"].split(";")[0] == "application/json"
    return json.loads(body)


def schema_for(document, schema):
    """A schema that resolves the document's #/components/... references."""
    return dict(schema, components=document["components"])


def check(document, schema, instance):
    OAS30Validator(schema_for(document, schema)).validate(instance)


def operation(document, method, path):
    return document["paths"][path][method]


def test_openapi_json_is_a_valid_openapi_document(document):
    validate(document)
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] == "iflow2api"
    assert document["info"]["version"] == iflow2api.__version__


def test_every_public_endpoint_is_described(document, server):
    listed = {(method, path) for path, item in document["paths"].items() for method in item
              if method in ("get", "post", "put", "patch", "delete")}
    assert PUBLIC <= listed, PUBLIC - listed
    # Every canonical /v1 route the server really has is in the document (the aliases
    # without /v1, with a trailing slash or under /api/v1 are left out on purpose).
    routes = [(m, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", p)) for m, p in server.app.router.routes()]
    canonical = {(m.lower(), p) for m, p in routes
                 if p.startswith("/v1/") and not p.endswith("/") and not p.startswith("/admin")}
    assert canonical, "the router lists no /v1 routes"
    assert canonical <= listed, canonical - listed


def test_each_endpoint_has_request_and_response_schemas(document):
    schemas = document["components"]["schemas"]

    def resolved(schema):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            assert name in schemas, schema["$ref"]
            return schemas[name]
        return schema

    for method, path in sorted(PUBLIC):
        op = operation(document, method, path)
        assert op.get("summary"), (method, path)
        if method == "post":
            body = op.get("requestBody")
            assert body and body.get("required") is True, (method, path)
            request_schema = resolved(body["content"]["application/json"]["schema"])
            assert request_schema.get("type") == "object" and request_schema.get("properties"), (method, path)
            assert "messages" in request_schema["properties"]
            assert "messages" in request_schema.get("required", [])
        else:
            assert "requestBody" not in op
        for name in re.findall(r"\{(\w+)\}", path):
            params = [p for p in op.get("parameters", []) if p["name"] == name]
            assert params and params[0]["in"] == "path" and params[0]["required"] is True, (path, name)
            assert params[0]["schema"]["type"] == "string"
        ok = op["responses"]["200"]
        ok_schema = resolved(ok["content"]["application/json"]["schema"])
        assert ok_schema.get("type") == "object" and ok_schema.get("properties"), (method, path)
        error = op["responses"].get("default") or op["responses"].get("400")
        assert error and resolved(error["content"]["application/json"]["schema"])["properties"]["error"]
    for path in ("/v1/chat/completions", "/v1/messages"):
        assert "text/event-stream" in operation(document, "post", path)["responses"]["200"]["content"], path


def test_live_answers_fit_the_documented_schemas(document, server, fake_upstream):
    def ok_schema(method, path, media="application/json"):
        return operation(document, method, path)["responses"]["200"]["content"][media]["schema"]

    def request_schema(path):
        return operation(document, "post", path)["requestBody"]["content"]["application/json"]["schema"]

    # The requests we send are valid by the document, and what comes back fits it.
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES),
                       ("/v1/messages/count_tokens", MESSAGES)):
        check(document, request_schema(path), body)
        status, headers, answer = http(server, "POST", path, body)
        assert status == 200, (path, answer)
        check(document, ok_schema("post", path), json.loads(answer))

    status, headers, answer = http(server, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert "text/event-stream" in operation(document, "post", "/v1/chat/completions")["responses"]["200"]["content"]

    for path, documented in (("/v1/models", "/v1/models"), ("/v1/models/glm-5", "/v1/models/{model_id}"),
                             ("/health", "/health"), ("/v1/vision-models", "/v1/vision-models")):
        status, headers, answer = http(server, "GET", path)
        assert status == 200, (path, answer)
        assert headers["content-type"].split(";")[0] == "application/json"
        check(document, ok_schema("get", documented), json.loads(answer))

    # Errors, in both dialects, fit the documented error schema.
    for path, body in (("/v1/chat/completions", {"messages": "nope"}), ("/v1/messages", {"model": "glm-5"})):
        status, headers, answer = http(server, "POST", path, body)
        assert status == 400, (path, answer)
        check(document, operation(document, "post", path)["responses"]["default"]["content"]
              ["application/json"]["schema"], json.loads(answer))
    status, headers, answer = http(server, "GET", "/v1/models/no-such-model")
    assert status == 404
    check(document, operation(document, "get", "/v1/models/{model_id}")["responses"]["default"]["content"]
          ["application/json"]["schema"], json.loads(answer))


def test_documented_paths_exist_on_the_server(document, server):
    for path, item in document["paths"].items():
        for method in item:
            concrete = re.sub(r"\{\w+\}", "glm-5", path)
            status, _headers, body = http(server, method.upper(), concrete, {} if method == "post" else None)
            if status == 404:  # a route that exists answers 404 only for a missing thing, never "no route"
                assert "no route" not in json.loads(body)["error"]["message"], (method, path)
            assert status != 405, (method, path, status)
