"""What a hostile web page (or request) can do to a server on 127.0.0.1, tried for real on a running
server: DNS rebinding (a foreign Host header), cross-site form posts, foreign Origins, fetches of
loopback and private addresses through image URLs (checked again on each redirect), decompression
bombs; and the headers every response carries."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from mlx_gemma3n.server import media
from mlx_gemma3n.server.errors import ApiError
from mlx_gemma3n.server.media import MediaLimits, image_from_url

from helpers import raw_http, running_server

PNG = io.BytesIO()
Image.new("RGB", (32, 24), (200, 30, 30)).save(PNG, "PNG")
PNG = PNG.getvalue()


@pytest.fixture(scope="module")
def server(tiny_ckpt_256, tmp_path_factory):
    arguments = ["--model", str(tiny_ckpt_256.path), "--allow-remote-media", "--allowed-host", "gemma.local",
                 "--allow-origin", "http://app.example:3000"]
    with running_server(arguments, tmp_path_factory.mktemp("security_log") / "stderr.txt") as url:
        yield url


@pytest.fixture(scope="module")
def model_id(tiny_ckpt_256):
    return tiny_ckpt_256.path.name


class Target:
    """A local web server that counts what it is asked for: /cat.png, and /hop (a redirect)."""

    def __init__(self):
        self.paths: list[str] = []
        self.redirect_to = ""
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                target.paths.append(self.path)
                if self.path == "/hop":
                    self.send_response(302)
                    self.send_header("Location", target.redirect_to)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def target():
    served = Target()
    yield served
    served.httpd.shutdown()


def chat_body(model_id, content="hi"):
    return {"model": model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}


def image_body(model_id, url):
    return chat_body(model_id, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])


def test_a_foreign_host_gets_421_before_any_body_is_read(server, model_id):
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{int(port) + 1}", ""):
        answer = raw_http(server, f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                                  "Content-Length: 100000000\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 421"), (host, answer[:80])
        assert b"GET /health" not in answer
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"gemma.local:{port}", "localhost"):
        assert httpx.get(f"{server}/health", headers={"Host": host}).status_code == 200, host
    reply = httpx.post(f"{server}/v1/chat/completions", json=chat_body(model_id), headers={"Host": f"gemma.local:{port}"}, timeout=300)
    assert reply.status_code == 200


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain", None])
def test_a_post_that_is_not_json_gets_415(server, model_id, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": "x"}', headers=headers, timeout=60)
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


def test_a_foreign_origin_gets_403_and_allowed_ones_pass(server, model_id):
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
        response = httpx.post(f"{server}/v1/chat/completions", json=chat_body(model_id), headers={"Origin": origin}, timeout=60)
        assert response.status_code == 403, origin
    for origin in (server, server.replace("127.0.0.1", "localhost"), "http://app.example:3000"):
        response = httpx.post(f"{server}/v1/chat/completions", json=chat_body(model_id), headers={"Origin": origin}, timeout=300)
        assert response.status_code == 200, origin


def test_every_response_carries_the_security_headers(server, model_id):
    for response in (httpx.get(f"{server}/health"), httpx.get(f"{server}/v1/models"), httpx.get(f"{server}/nope"),
                     httpx.get(f"{server}/health", headers={"Host": "evil.example"})):
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_image_urls_on_loopback_or_private_addresses_are_never_fetched(server, model_id, target):
    for url in (f"http://127.0.0.1:{target.port}/cat.png", f"http://localhost:{target.port}/cat.png",
                f"http://[::ffff:127.0.0.1]:{target.port}/cat.png", "http://10.0.0.1/cat.png", "http://169.254.169.254/latest/meta-data"):
        response = httpx.post(f"{server}/v1/chat/completions", json=image_body(model_id, url), timeout=60)
        assert response.status_code == 400, url
        error = response.json()["error"]
        assert error["param"] == "messages[0].content[0].image_url.url" and "non-public" in error["message"]
    assert target.paths == []


def test_private_media_is_fetched_only_when_allowed(target):
    url = f"http://127.0.0.1:{target.port}/cat.png"
    with pytest.raises(ApiError):
        image_from_url(url, "url", MediaLimits(allow_remote=True))
    assert target.paths == []
    assert image_from_url(url, "url", MediaLimits(allow_remote=True, allow_private=True)).size == (32, 24)
    assert target.paths == ["/cat.png"]


@pytest.mark.parametrize("redirect_host", ["flip.example", "127.0.0.1"])
def test_each_redirect_is_checked_again(target, monkeypatch, redirect_host):
    """A name that passes the check once and then points home (rebinding), or a redirect to another
    host that is home: the first connection is let through, the redirect's own connection is refused,
    the target never sees the second request."""
    real_lookup, real_check = media.socket.getaddrinfo, media.non_public
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda host, port, **kw: real_lookup("127.0.0.1" if host == "flip.example" else host, port, **kw))
    checks = []

    def passes_once(address):
        checks.append(address)
        return len(checks) > 1 and real_check(address)

    monkeypatch.setattr(media, "non_public", passes_once)
    target.redirect_to = f"http://{redirect_host}:{target.port}/cat.png"
    with pytest.raises(ApiError) as refused:
        image_from_url(f"http://flip.example:{target.port}/hop", "url", MediaLimits(allow_remote=True))
    assert "non-public" in refused.value.message
    assert target.paths == ["/hop"]


def test_redirects_go_to_http_or_https_only(target):
    """Across hosts when the addresses are allowed; never to ftp (urllib's own rule lets it through,
    and no address check covers it)."""
    allowed = MediaLimits(allow_remote=True, allow_private=True)
    target.redirect_to = f"http://localhost:{target.port}/cat.png"
    assert image_from_url(f"http://127.0.0.1:{target.port}/hop", "url", allowed).size == (32, 24)
    assert target.paths == ["/hop", "/cat.png"]
    target.redirect_to = f"ftp://127.0.0.1:{target.port}/cat.png"
    with pytest.raises(ApiError) as refused:
        image_from_url(f"http://127.0.0.1:{target.port}/hop", "url", allowed)
    assert "redirect to ftp://" in refused.value.message and "http and https only" in refused.value.message
    assert target.paths == ["/hop", "/cat.png", "/hop"]


def test_a_decompression_bomb_is_refused_from_its_header(server, model_id):
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")  # 81 M pixels in a few kB
    assert len(bomb.getvalue()) < 200_000
    url = "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()
    response = httpx.post(f"{server}/v1/chat/completions", json=image_body(model_id, url), timeout=60)
    assert response.status_code == 400
    assert "9000 x 9000 pixels, over the limit of 50000000" in response.json()["error"]["message"]
