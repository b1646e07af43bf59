"""Other websites cannot drive an open service through a developer's browser (cross-site requests, DNS rebinding),
every answer carries the browser security headers, and an upload's file name is stored printable.

The real service (uvicorn on 127.0.0.1, no keys: its default) for what depends on the address a request arrives on;
TestClient (whose requests arrive on "testserver", not a loopback address: as behind a load balancer) for the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from app.filenames import clean_filename
from app.origin_guard import guard_of
from tests import models
from tests.service import running_service
from tests.test_dashboard import browser, needs_chromium, wait_for  # noqa: F401 - `browser` is a fixture

MLP = models.mlp()
KEY = "web-hardening-admin-key-0123456789"
EVIL = "http://evil.example"
SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def _files(filename: str = "m.onnx") -> dict[str, tuple[str, bytes, str]]:
    return {"file": (filename, MLP.SerializeToString(), "application/octet-stream")}


def _predict_body() -> str:
    feed = models.random_feed(MLP, batch=1)
    return json.dumps({"inputs": {k: v.tolist() for k, v in feed.items()}})


def _has_security_headers(response: httpx.Response) -> bool:
    return all(response.headers.get(k) == v for k, v in SECURITY.items())


@pytest.fixture(scope="module")
def open_service(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - the base URL
    """The default configuration: no keys, on 127.0.0.1 (uvicorn, the short HTTP path on); `good` uploaded."""
    with running_service(tmp_path_factory.mktemp("open"), run_worker="false") as (base, _):
        uploaded = httpx.post(f"{base}/v1/models", files=_files(), data={"name": "good", "precision": "fp32"},
                              timeout=60)
        assert uploaded.status_code == 202, uploaded.text
        yield base


def test_a_cross_site_upload_or_delete_is_refused_and_changes_nothing(open_service: str) -> None:
    port = open_service.rsplit(":", 1)[1]
    refused = httpx.post(f"{open_service}/v1/models", files=_files(), data={"name": "planted"},
                         headers={"Origin": EVIL}, timeout=60)
    assert refused.status_code == 403, refused.text
    assert "Origin: http://evil.example" in refused.json()["error"]
    assert "ONNXFORGE_CORS_ORIGINS" in refused.json()["error"]
    assert _has_security_headers(refused)
    # Without an Origin, a browser's own word that the request is cross-site refuses it too.
    refused = httpx.delete(f"{open_service}/v1/models/good", headers={"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403, refused.text
    # Sandboxed frames and file:// pages send "null": another origin.
    assert httpx.delete(f"{open_service}/v1/models/good", headers={"Origin": "null"}).status_code == 403
    # A page on another port of the same machine is another origin.
    assert httpx.delete(f"{open_service}/v1/models/good",
                        headers={"Origin": "http://127.0.0.1:1"}).status_code == 403
    names = [m["name"] for m in httpx.get(f"{open_service}/v1/models").json()]
    assert names == ["good"]
    # The dashboard's own requests (same origin, any loopback name) and clients without an Origin go through.
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):
        headers = {"Origin": origin, "Host": origin.removeprefix("http://")} if origin else {}
        sent = httpx.post(f"{open_service}/v1/models", files=_files(), data={"name": "mine"}, headers=headers,
                          timeout=60)
        assert sent.status_code == 202, (origin, sent.text)
    deleted = httpx.delete(f"{open_service}/v1/models/mine",
                           headers={"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"})
    assert deleted.status_code == 200, deleted.text


def test_a_rebound_host_name_is_refused_on_a_loopback_address(open_service: str) -> None:
    port = open_service.rsplit(":", 1)[1]
    for method in ("GET", "DELETE"):
        refused = httpx.request(method, f"{open_service}/v1/models/good", headers={"Host": f"evil.example:{port}"})
        assert refused.status_code == 403, refused.text
        message = refused.json()["error"]
        assert "'evil.example:" in message and "ONNXFORGE_API_KEYS" in message and "ONNXFORGE_HOST" in message
    refused = httpx.get(f"{open_service}/", headers={"Host": "evil.example"})
    assert refused.status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"app.localhost:{port}"):
        assert httpx.get(f"{open_service}/v1/models/good", headers={"Host": host}).status_code == 200, host
    assert httpx.get(f"{open_service}/v1/models/good").status_code == 200  # the model is still there


def test_the_dashboard_and_the_api_answer_with_security_headers(open_service: str) -> None:
    page = httpx.get(f"{open_service}/")
    assert page.status_code == 200 and _has_security_headers(page)
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'none'" in csp
    for path, status in (("/static/dashboard.js", 200), ("/v1/models", 200), ("/healthz", 200),
                         ("/v1/models/nope", 404), ("/metrics", 200), ("/docs", 200)):
        response = httpx.get(f"{open_service}{path}")
        assert response.status_code == status and _has_security_headers(response), path


def test_the_short_http_path_refuses_a_cross_site_predict_and_sends_the_headers(open_service: str) -> None:
    """uvicorn answers /v1 predict and /v2 infer without the ASGI stack: the same rule and headers there."""
    path = f"{open_service}/v1/models/good/predict"
    served = httpx.post(path, content=_predict_body(), headers={"Content-Type": "application/json"})
    assert served.status_code == 200 and _has_security_headers(served), served.headers
    refused = httpx.post(path, content=_predict_body(), headers={"Origin": EVIL, "Content-Type": "text/plain"})
    assert refused.status_code == 403, refused.text
    assert httpx.post(path, content=_predict_body(), headers={"Host": "evil.example"}).status_code == 403


def test_the_asgi_fast_path_refuses_a_cross_site_predict_and_sends_the_headers(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.client.app.fast_infer is not None
        assert api.upload(MLP, name="good", precision="fp32").status_code == 202
        served = api.client.post("/v1/models/good/predict", content=_predict_body())
        assert served.status_code == 200 and _has_security_headers(served), served.headers
        refused = api.client.post("/v1/models/good/predict", content=_predict_body(),
                                  headers={"Origin": EVIL, "Content-Type": "text/plain"})
        assert refused.status_code == 403 and _has_security_headers(refused), refused.text
        # Arrived on a non-loopback address ("testserver": behind a load balancer): any Host name is served.
        assert api.client.get("/v1/models", headers={"Host": "onnxforge.internal.example"}).status_code == 200


def test_cors_origins_are_allowed_and_keys_turn_the_guard_off(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, cors_origins="https://ui.example/") as api:
        allowed = api.client.post("/v1/models", files=_files(), data={"name": "ui"},
                                  headers={"Origin": "https://ui.example"})
        assert allowed.status_code == 202, allowed.text
        refused = api.client.post("/v1/models", files=_files(), data={"name": "x"}, headers={"Origin": EVIL})
        assert refused.status_code == 403, refused.text
    with serve(run_worker=False, api_keys=f"admin:{KEY}") as api:
        # A key is never sent by a browser on its own: with keys, the key check decides, not the Origin.
        keyed = api.client.post("/v1/models", files=_files(), data={"name": "k"},
                                headers={"Origin": EVIL, "Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 202, keyed.text
        refused = api.client.post("/v1/models", files=_files(), data={"name": "k2"}, headers={"Origin": EVIL})
        assert refused.status_code == 401 and _has_security_headers(refused)


def test_the_guard_compares_origins_as_browsers_and_proxies_send_them() -> None:
    guard = guard_of(True, [])
    loopback = ("127.0.0.1", 8000)

    def refused(method: str, host: str | None, origin: str | None = None, server: tuple = loopback) -> bool:
        return guard.refusal(method, host and host.encode(), origin and origin.encode(), None, server) is not None

    assert not refused("POST", "[::1]:8000", "http://[::1]:8000", ("::1", 8000))
    assert not refused("POST", "localhost", "https://localhost:8080")  # nginx's $host drops the port
    assert refused("POST", "localhost:8000", "http://localhost:8080")
    assert refused("POST", "localhost:8000", "http://localhost")  # port 80
    assert not refused("POST", "localhost:80", "http://LOCALHOST")
    assert refused("POST", "localhost:8000", "ftp://localhost:8000")
    assert refused("POST", None, "http://localhost:8000")  # nothing to compare with
    assert not refused("GET", "localhost:8000", EVIL)  # reading: the browser keeps the answer from the page
    assert refused("GET", "127.0.0.1.nip.io:8000")
    assert not refused("GET", "evil.example", server=("10.1.2.3", 8000))  # behind a load balancer
    assert not refused("GET", "evil.example", server=None)  # a Unix socket
    assert not refused("GET", "evil.example", server=("::ffff:10.0.0.1", 8000))
    assert refused("GET", "evil.example", server=("::ffff:127.0.0.1", 8000))
    assert not guard_of(False, []).refusal("DELETE", b"evil.example", EVIL.encode(), None, loopback)


@pytest.mark.parametrize(("raw", "clean"), [
    ("model.onnx", "model.onnx"),
    ("\u202egnp.onnx", "gnp.onnx"),  # the right-to-left override
    ("\r\nSet-Cookie: x.onnx", "Set-Cookie: x.onnx"),
    ("a\x00b\x1b[31m\u200bc.onnx", "ab[31mc.onnx"),
    ("Modèle\u00a0日本語.onnx", "Modèle 日本語.onnx"),  # letters of every script stay; a no-break space is a space
    ("<img src=x onerror=alert(1)>.onnx", "<img src=x onerror=alert(1)>.onnx"),  # printable: JSON escapes it
    ("\u2028\t ", None),
    (None, None),
])
def test_an_uploaded_file_name_is_made_printable(raw: str | None, clean: str | None) -> None:
    assert clean_filename(raw) == clean


def test_a_long_file_name_is_cut_to_255_characters_keeping_its_extension() -> None:
    name = clean_filename("é" * 400 + ".onnx")
    assert name is not None and len(name) == 255 and name.endswith("é.onnx")
    assert len(clean_filename("x" * 300) or "") == 255


def test_the_stored_file_name_is_the_clean_one(serve, tmp_path: Path) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(MLP, filename="\u202egnp\u200b.onnx", name="named").status_code == 202
        versions = api.client.get("/v1/models/named").json()["versions"]
        assert [v["filename"] for v in versions] == ["gnp.onnx"]


# -- in Chromium: a real browser on another origin, and the dashboard under its CSP --------------------------------

PLANT = """<!doctype html><script>
const form = new FormData();
form.append("file", new Blob([Uint8Array.from(atob("%s"), c => c.charCodeAt(0))]), "m.onnx");
form.append("name", "%s");
window.done = fetch("%s/v1/models", {method: "POST", mode: "no-cors", body: form}).then(() => "sent", String);
</script>"""


@needs_chromium
def test_a_page_of_another_origin_cannot_plant_a_model_but_the_dashboard_uploads(
        browser, tmp_path: Path) -> None:  # noqa: ANN001, F811 - the fixture imported from tests/test_dashboard.py
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    model_b64 = base64.b64encode(MLP.SerializeToString()).decode()
    with running_service(tmp_path, run_worker="false") as (base, _):
        class Evil(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                page = (PLANT % (model_b64, "planted", base)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        evil = ThreadingHTTPServer(("127.0.0.1", 0), Evil)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        try:
            # A page on another origin (another port of this machine) sends the "simple" multipart POST.
            browser.get(f"http://127.0.0.1:{evil.server_address[1]}/")
            assert browser.execute_async_script("window.done.then(arguments[0])") == "sent"
            assert httpx.get(f"{base}/v1/models/planted").status_code == 404
        finally:
            evil.shutdown()
            evil.server_close()
        # The dashboard, under its CSP and with no keys, uploads from its own origin (its fetch sends an Origin).
        browser.get(base.replace("127.0.0.1", "localhost") + "/")
        browser.execute_script("window.violations = []; document.addEventListener('securitypolicyviolation',"
                               " (e) => window.violations.push(e.violatedDirective + ' ' + e.blockedURI))")
        (tmp_path / "m.onnx").write_bytes(MLP.SerializeToString())
        browser.find_element("css selector", "input[name=file]").send_keys(str(tmp_path / "m.onnx"))
        browser.find_element("css selector", "input[name=name]").send_keys("mine")
        browser.find_element("css selector", "#upload button[type=submit]").click()
        wait_for(browser, "document.querySelector('#job-text').textContent.startsWith('mine v1')", timeout=60)
        assert httpx.get(f"{base}/v1/models/mine").status_code == 200
        assert browser.execute_script("return window.violations") == []
