"""The API's route table (actors/api/http.py): levels follow the methods, and the OpenAPI description lists all."""

from __future__ import annotations

from actors.api.http import API, ROUTES, openapi_document
from core.access import ADMIN, READ


def test_every_state_change_needs_admin_and_every_read_only_read() -> None:
    for route in ROUTES:
        assert route.level == (READ if route.method == "GET" else ADMIN), route.path


def test_the_openapi_description_lists_every_route_with_its_level_and_body() -> None:
    doc = openapi_document()
    listed = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert listed == {(r.method, API + r.path.replace("{key:.+}", "{key}")) for r in ROUTES}
    add = doc["paths"][f"{API}/rules"]["post"]
    assert add["security"] == [{ADMIN: []}]
    assert add["requestBody"]["content"]["application/json"]["schema"]["properties"]["interface"] == {"type": "string"}
    respond = doc["paths"][f"{API}/notifications/{{id}}/respond"]["post"]
    assert respond["requestBody"]["content"]["application/json"]["schema"]["required"] == ["action"]
    assert [p["name"] for p in respond["parameters"]] == ["id"]
