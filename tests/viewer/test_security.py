"""Logout ends the session on the server, and every response carries the security headers (issue 22).

A light app on an empty data directory (no slide, no analysis): what is checked here does not
depend on a case.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from dicom_node.app.web import make_web_app
from dicom_node.settings import Settings
from tests.viewer.conftest import PASSWORD, login
from viewer.auth import add_user
from viewer.slides import OPENSEADRAGON_DIR

TEMPLATES = Path(__file__).resolve().parents[2] / "viewer" / "templates"
STATIC = TEMPLATES.parent / "static"
HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
#: What the Content-Security-Policy must at least say; its full text is checked below.
CSP_PARTS = ("default-src 'self'", "script-src 'self'", "object-src 'none'", "frame-ancestors 'none'")


def _has_security_headers(headers) -> bool:
    csp = headers.get("Content-Security-Policy", "")
    return all(headers.get(name) == value for name, value in HEADERS.items()) \
        and all(part in csp.split("; ") for part in CSP_PARTS)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = make_web_app(Settings(data_dir=tmp_path / "node"))
    store = app.extensions["cytonode.store"]
    add_user(store, "tech", "technologist", PASSWORD)
    add_user(store, "admin", "admin", PASSWORD)
    yield app
    store.close()


def test_a_cookie_saved_before_logout_is_refused_after_it(app: Flask) -> None:
    client = app.test_client()
    token = login(client, "tech")
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert client.get("/api/me").status_code == 200

    rsp = client.post("/logout", data={"csrf_token": token})
    assert rsp.status_code == 302
    assert client.get("/api/me").status_code == 401

    replay = app.test_client()  # someone who kept a copy of the cookie
    replay.set_cookie("session", cookie.value)
    assert replay.get("/api/me").status_code == 401
    assert replay.get("/").status_code == 302  # the worklist sends it to the login page

    # Logging in again gives a new session that works; the old copy stays refused.
    login(client, "tech")
    assert client.get("/api/me").status_code == 200
    assert replay.get("/api/me").status_code == 401


def test_logout_ends_only_that_session(app: Flask) -> None:
    desk, laptop = app.test_client(), app.test_client()
    token = login(desk, "tech")
    login(laptop, "tech")
    assert desk.post("/logout", data={"csrf_token": token}).status_code == 302
    assert desk.get("/api/me").status_code == 401
    assert laptop.get("/api/me").json["username"] == "tech"


def _example_path(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: "1.2.3" if "uid" in m.group(1) else "x", rule)


@pytest.mark.parametrize("who", [None, "tech", "admin"])
def test_every_route_sends_the_security_headers(app: Flask, who: str | None) -> None:
    client = app.test_client()
    if who:
        login(client, who)
    checked = 0
    for rule in app.url_map.iter_rules():
        path = _example_path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            rsp = client.open(path, method=method)
            assert _has_security_headers(rsp.headers), (method, path, rsp.status_code, rsp.headers)
            checked += 1
    for path in ("/static/app.css", "/static/common.js", "/vendor/openseadragon/openseadragon.min.js",
                 "/no/such/page", "/api/no/such/route"):
        assert _has_security_headers(client.get(path).headers), path
    assert checked > 20


def test_pages_need_no_inline_script_or_style() -> None:
    """The CSP has no 'unsafe-inline': no template may rely on inline code or style attributes."""
    for template in TEMPLATES.glob("*.html"):
        html = template.read_text()
        for tag in re.findall(r"<script\b[^>]*>", html):
            assert "src=" in tag, f"{template.name}: inline script {tag}"
        assert not re.search(r"<style\b", html), f"{template.name}: inline <style>"
        assert not re.search(r"\sstyle\s*=", html), f"{template.name}: style attribute"
        assert not re.search(r"\son[a-z]+\s*=", html), f"{template.name}: inline event handler"
    for script in STATIC.glob("*.js"):
        assert not re.search(r"\beval\(|new Function\(|innerHTML\s*=", script.read_text()), script.name


def test_csp_allows_exactly_the_style_openseadragon_adds() -> None:
    from viewer.common import CONTENT_SECURITY_POLICY, OPENSEADRAGON_STYLE, OPENSEADRAGON_STYLE_HASH

    digest = base64.b64encode(hashlib.sha256(OPENSEADRAGON_STYLE.encode()).digest()).decode()
    assert OPENSEADRAGON_STYLE_HASH == f"sha256-{digest}"
    assert f"'{OPENSEADRAGON_STYLE_HASH}'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "unsafe-eval" not in CONTENT_SECURITY_POLICY
    build = OPENSEADRAGON_DIR / "openseadragon.min.js"
    if not build.exists():
        pytest.skip("node_modules/openseadragon is missing: run `npm ci`")
    injected = re.findall(r'textContent="([^"]*openseadragon-canvas[^"]*)"', build.read_text())
    assert injected == [OPENSEADRAGON_STYLE], "OpenSeadragon changed its inline style: update the hash"
