"""routes: request targets normalized, then matched against the allow-list (issue 10 item 2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.gateway import routes


@pytest.mark.parametrize(("method", "target", "kind", "path"), [
    ("POST", "/v1/chat/completions", "chat", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/", "chat", "/v1/chat/completions"),
    ("POST", "//v1//chat///completions//", "chat", "/v1/chat/completions"),
    ("POST", "/v1/./chat/completions?x=1", "chat", "/v1/chat/completions"),
    ("POST", "/v1/%63hat/completions", "chat", "/v1/chat/completions"),
    ("POST", "/v1/x/../chat/completions", "chat", "/v1/chat/completions"),
    ("GET", "/v1/../metrics", "metrics", "/metrics"),
    ("GET", "/v1/%2e%2e/health", "health", "/health"),
    ("GET", "/v1/responses/resp_abc-12", "passthrough", "/v1/responses/resp_abc-12"),
    ("POST", "/v1/responses/resp_1/cancel/", "passthrough", "/v1/responses/resp_1/cancel"),
])
def test_targets_become_canonical_routes(method: str, target: str, kind: str, path: str
                                         ) -> None:
    found = routes.match(method, target)
    assert isinstance(found, routes.Match), found
    assert found.route.kind == kind and found.path == path


@pytest.mark.parametrize("target", [
    "/v1/../admin", "/v1/%2e%2e/admin", "/v1/..%2f..%2fadmin", "/v1/%2e%2e%2fadmin",
    "/update_weights_from_disk", "/v1/load_lora_adapter", "/v1/%252e%252e/admin",
    "/v1/chat%00/completions", "/v1\\..\\admin", "/v1/responses/a%2Fb", "/v1/responses/a b",
    "http://127.0.0.1/v1/chat/completions", "", "/v1/chat/completions%ff",
    "/v1/" + "a/" * 2000, "/v1/responses/" + "x" * 129,
])
def test_everything_else_is_no_route(target: str) -> None:
    found = routes.match("POST", target)
    assert isinstance(found, routes.NoRoute) and found.status == 404, found


def test_a_wrong_method_names_the_allowed_ones() -> None:
    found = routes.match("POST", "/health/")
    assert isinstance(found, routes.NoRoute)
    assert found.status == 405 and found.allow == frozenset({"GET", "HEAD"})
    assert isinstance(routes.match("DELETE", "/v1/chat/completions"), routes.NoRoute)


@given(st.text(alphabet="/.%2e5cfa:?#\\\x00abv1", max_size=60))
def test_whatever_matches_is_a_route_of_the_table_and_its_path_is_canonical(target: str) -> None:
    found = routes.match("POST", target)
    if isinstance(found, routes.Match):
        assert found.route in routes.ROUTES
        assert ".." not in found.path.split("/") and "//" not in found.path
        assert routes.normalize(found.path) == found.path
        assert routes.find(found.path) is found.route


def test_credentials_in_an_external_url_are_redacted() -> None:
    url = "http://alice:s3cr%40t@10.0.0.2:8000"
    text = f"the engine of ext ({url}) failed: cannot connect to alice:s3cr@t@10.0.0.2"
    out = routes.redact(text, url)
    assert "s3cr" not in out and "alice" not in out and "10.0.0.2:8000" in out
    assert routes.redact("no credentials", "http://10.0.0.2:8000") == "no credentials"
