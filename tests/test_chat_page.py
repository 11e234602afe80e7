"""The chat page at `/`, driven in a real browser: Playwright for Python runs Debian's Chromium headless
(tests/install.sh installs both) against `python -m mlx_gemma3n.server` on the tiny checkpoint, with an
API key. Every reply the page shows is checked against the Python API's greedy reply for the same
messages (which the generation tests hold equal to Transformers'); what a server can't be made to say
(markup, errors) is served to the page by Playwright's request routing."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
import soundfile
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from mlx_gemma3n import generate, load

from helpers import running_server
from videos import tone, write_sound, write_video

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
API_KEY = "page-key"
WAIT_MS = 180_000  # waits end on a condition; this only bounds a broken page on a busy machine
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_256):
    return load(tiny_ckpt_256.path)


@pytest.fixture(scope="module")
def server(tiny_ckpt_256, tmp_path_factory):
    arguments = ["--model", str(tiny_ckpt_256.path), "--api-key", API_KEY, "--max-batch", "4"]
    with running_server(arguments, tmp_path_factory.mktemp("page_server_log") / "stderr.txt") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), "the browser tests need Debian's chromium (tests/install.sh installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"],
        )
        yield browser
        browser.close()


def open_page(browser, server, **context_options):
    """A fresh browser profile on the page, the API key given when it asks; returns (context, page)."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800}, **context_options)
    page = context.new_page()
    page.goto(server + "/")
    page.get_by_role("textbox", name="API key").fill(API_KEY)
    page.get_by_role("button", name="Save").click()
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    expect(page.get_by_label("Model")).not_to_have_value("")
    return context, page


@pytest.fixture
def page(browser, server):
    context, page = open_page(browser, server)
    yield page
    context.close()


def set_options(page, temperature="0", max_tokens="16", system=None, tools=None, tool_choice=None):
    page.get_by_text("Settings", exact=True).click()
    page.get_by_label("Temperature").fill(temperature)
    page.get_by_label("Max tokens").fill(max_tokens)
    if system is not None:
        page.get_by_label("System prompt").fill(system)
    if tools is not None:
        page.get_by_label("Tools").fill(json.dumps(tools))
    if tool_choice is not None:
        page.get_by_label("Tool choice").select_option(tool_choice)
    page.get_by_text("Settings", exact=True).click()


def send(page, text):
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


def last_reply(page):
    """The last reply, once finished: its markdown source as the page shows it."""
    reply = page.get_by_role("article").last
    expect(reply.locator(".stats")).not_to_have_text("")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    reply.get_by_role("button", name="Show the reply's source").click()
    return reply, reply.locator(".source").text_content()


def greedy(loaded, messages, max_tokens, **kwargs):
    model, processor = loaded
    return generate(model, processor, messages, max_tokens, temperature=0.0, **kwargs)


def test_a_streamed_reply_equals_the_apis_greedy_reply(page, loaded):
    requests = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    set_options(page, max_tokens="24", system="Answer briefly.")
    box = page.get_by_role("textbox", name="Message")
    box.type("hello")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("there")
    box.press("Enter")
    reply, source = last_reply(page)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello\nthere"}]
    assert source == greedy(loaded, messages, 24)
    assert requests[-1]["stream"] is True and requests[-1]["messages"] == messages
    stats = reply.locator(".stats").text_content()
    assert "24 tokens" in stats and "tok/s" in stats and "first token" in stats
    assert page.get_by_role("group", name="You").text_content() == "hello\nthere"


def test_stop_ends_a_long_reply_and_the_conversation_goes_on(page, loaded):
    set_options(page, max_tokens="2000")
    send(page, "tell me a long story")
    reply = page.get_by_role("article").last
    expect(reply.locator(".body")).not_to_have_text("")  # streaming has begun
    page.keyboard.press("Escape")
    expect(reply.locator(".stats")).to_contain_text("stopped")
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    partial = reply.locator(".source").text_content()
    whole = greedy(loaded, [{"role": "user", "content": "tell me a long story"}], 2000)
    assert 0 < len(partial) < len(whole) and whole.startswith(partial)
    set_options(page, max_tokens="8")
    send(page, "go on")
    _, source = last_reply(page)
    history = [{"role": "user", "content": "tell me a long story"}, {"role": "assistant", "content": partial},
               {"role": "user", "content": "go on"}]
    assert source == greedy(loaded, history, 8)


def test_an_attached_image_and_wav_give_the_apis_reply(page, loaded, tiny_media, tmp_path):
    image, clip = tiny_media["image"], tiny_media["audio"]
    (tmp_path / "notes.txt").write_text("not media")
    set_options(page, max_tokens="12")
    attach = page.get_by_label("Attach", exact=True)
    attach.set_input_files([image, clip])
    attach.set_input_files([tmp_path / "notes.txt"])
    expect(page.get_by_role("alert")).to_contain_text("notes.txt: attach an image")
    page.get_by_label("Attach", exact=True).set_input_files([image])
    page.get_by_role("button", name="Remove picture.png").last.click()  # a chip removed before sending
    expect(page.get_by_label("Attachments")).to_have_text("picture.png×clip.wav×")
    send(page, "What do you see and hear?")
    _, source = last_reply(page)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "audio", "audio": str(clip)},
                                             {"type": "text", "text": "What do you see and hear?"}]}]
    assert source == greedy(loaded, messages, 12)
    you = page.get_by_role("group", name="You")
    expect(you.get_by_role("img", name="picture.png")).to_be_visible()
    expect(you.locator("audio")).to_have_count(1)


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_an_attached_video_or_voice_memo_gives_the_apis_reply(page, loaded, tiny_media, tmp_path, kind):
    """A video goes as a video_url part (the server shows the model its frames and sound, as the API
    does); an M4A (AAC, as Voice Memos saves) as an input_audio part, which the server decodes with FFmpeg."""
    if kind == "video":
        path = tmp_path / "clip.mp4"
        write_video(path, 3, 2, tone(3, 44100, [(0.5, 2.0)]))
    else:
        path = tmp_path / "memo.m4a"
        samples, rate = soundfile.read(tiny_media["audio"], dtype="float32")
        write_sound(str(path), samples, rate, "aac", "mp4")
    set_options(page, max_tokens="10")
    page.get_by_label("Attach", exact=True).set_input_files([path])
    expect(page.get_by_label("Attachments")).to_have_text(f"{path.name}×")
    send(page, "What happens?")
    _, source = last_reply(page)
    messages = [{"role": "user", "content": [{"type": kind, kind: str(path)}, {"type": "text", "text": "What happens?"}]}]
    assert source == greedy(loaded, messages, 10)
    expect(page.get_by_role("group", name="You").locator(kind)).to_have_count(1)


DROP_AND_PASTE = """async ([name, data]) => {
    const file = () => new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name, {type: "image/png"});
    const dropped = new DataTransfer(), pasted = new DataTransfer();
    dropped.items.add(file());
    pasted.items.add(file());
    document.getElementById("messages").dispatchEvent(new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));
    document.getElementById("message").dispatchEvent(new ClipboardEvent("paste", {clipboardData: pasted, bubbles: true}));
}"""


def test_images_dropped_on_the_page_or_pasted_are_attached(page, loaded, tiny_media):
    image = tiny_media["image"]
    set_options(page, max_tokens="6")
    page.evaluate(DROP_AND_PASTE, [image.name, base64.b64encode(image.read_bytes()).decode()])
    expect(page.get_by_label("Attachments")).to_have_text("picture.png×picture.png×")
    send(page, "two of them")
    _, source = last_reply(page)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}] * 2 + [{"type": "text", "text": "two of them"}]}]
    assert source == greedy(loaded, messages, 6)


def test_regenerate_and_edit(page, loaded):
    set_options(page, max_tokens="10")
    send(page, "first try")
    _, first = last_reply(page)
    page.get_by_role("button", name="Regenerate").click()
    _, again = last_reply(page)
    assert again == first == greedy(loaded, [{"role": "user", "content": "first try"}], 10)
    expect(page.get_by_role("article")).to_have_count(1)
    page.get_by_role("button", name="Edit").click()
    box = page.get_by_role("textbox", name="Message")
    expect(box).to_have_value("first try")
    expect(page.get_by_role("article")).to_have_count(0)
    box.fill("second try")
    page.get_by_role("button", name="Send").click()
    _, edited = last_reply(page)
    assert edited == greedy(loaded, [{"role": "user", "content": "second try"}], 10)


def test_conversations_survive_a_reload_and_round_trip_through_export(page, loaded, tmp_path):
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete ...?"
    set_options(page, max_tokens="6")
    send(page, "remember me")
    _, source = last_reply(page)
    page.reload()
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    expect(page.get_by_role("dialog")).to_have_count(0)  # the API key is kept: not asked again
    conversations = page.get_by_role("navigation", name="Conversations")
    expect(conversations.get_by_role("button", name="remember me", exact=True)).to_be_visible()
    expect(page.get_by_role("article")).to_have_count(1)
    assert page.get_by_role("article").locator(".source").text_content() == source
    assert page.get_by_label("Max tokens").input_value() == "6"  # settings are kept too

    conversations.get_by_role("button", name="Rename remember me").click()
    title = page.get_by_role("textbox", name="Title")
    title.fill("Kept")
    title.press("Enter")
    expect(conversations.get_by_role("button", name="Kept", exact=True)).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="Export").click()
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    (conversation,) = data["conversations"]
    assert conversation["title"] == "Kept" and [m["content"] for m in conversation["messages"]] == ["remember me", source]

    conversations.get_by_role("button", name="Delete Kept").click()
    expect(conversations.get_by_role("listitem")).to_have_count(0)
    expect(page.get_by_role("article")).to_have_count(0)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    page.get_by_label("Import").set_input_files(tmp_path / "bad.json")
    expect(page.get_by_role("alert")).to_contain_text("Import: the file is not an export of this page")
    page.get_by_label("Import").set_input_files(exported)
    expect(page.get_by_role("alert")).to_have_text("Imported 1 conversation.")
    conversations.get_by_role("button", name="Kept", exact=True).click()
    expect(page.get_by_role("article")).to_have_count(1)
    assert page.get_by_role("article").locator(".source").text_content() == source


def sse(*chunks) -> str:
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def content_chunk(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def test_the_page_says_when_the_server_is_down_or_refuses(page):
    set_options(page, max_tokens="4")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    send(page, "anyone there?")
    expect(page.get_by_role("alert")).to_have_text("The server cannot be reached: is it still running?")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.get_by_role("article")).to_have_count(0)
    page.unroute("**/v1/chat/completions")

    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=503, content_type="application/json", body=json.dumps({"error": {"message": "the engine is overloaded"}})))
    page.get_by_role("button", name="Regenerate").click()
    expect(page.get_by_role("alert")).to_have_text("The server refused the request: the engine is overloaded")
    page.unroute("**/v1/chat/completions")

    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body=f"data: {json.dumps(content_chunk('Half a'))}\n\ndata: {json.dumps({'error': {'message': 'the model failed'}})}\n\n"))
    page.get_by_role("button", name="Regenerate").click()
    expect(page.get_by_role("alert")).to_have_text("The server stopped the reply: the model failed")
    expect(page.get_by_role("article").last.locator(".body")).to_have_text("Half a")
    page.unroute("**/v1/chat/completions")

    set_options(page, max_tokens="0")  # refused by the real server, which names the parameter
    page.get_by_role("button", name="Regenerate").click()
    expect(page.get_by_role("alert")).to_contain_text("The server refused the request:")
    expect(page.get_by_role("alert")).to_contain_text("max_tokens")
    set_options(page, max_tokens="4")
    page.get_by_role("button", name="Regenerate").click()
    last_reply(page)
    expect(page.get_by_role("alert")).to_have_text("")


HOSTILE = ('<img src=x onerror=alert(1)> <script>alert(2)</script> [click me](javascript:alert(3)) '
           '<a href="javascript:alert(4)">there</a>\n\n**bold** and `code` and [a real link](https://example.com/)\n\n'
           '```python\nprint("<b>not bold</b>")\n```\n')


@pytest.mark.parametrize("csp", ["enforced", "bypassed"])
def test_model_output_renders_inert(browser, server, csp):
    """The rendering itself is inert: with the page's CSP bypassed too, no markup in a reply runs."""
    context, page = open_page(browser, server, bypass_csp=csp == "bypassed")
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    pieces = [HOSTILE[i:i + 7] for i in range(0, len(HOSTILE), 7)]  # split mid-tag, as tokens come
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse(*map(content_chunk, pieces))))
    send(page, "say something nasty")
    reply = page.get_by_role("article").last
    expect(reply.locator(".body code").last).to_have_text('print("<b>not bold</b>")')
    body = reply.locator(".body")
    assert body.locator("img, script, b, iframe").count() == 0
    assert body.locator("a").count() == 1
    assert body.locator("a").get_attribute("href") == "https://example.com/"
    assert "<img src=x onerror=alert(1)>" in body.text_content() and "[click me](javascript:alert(3))" in body.text_content()
    assert body.locator("strong").text_content() == "bold"
    page.wait_for_timeout(500)  # time for an injected handler to have fired
    assert dialogs == []
    context.close()


def test_the_page_and_the_api_carry_the_security_headers(page, server):
    import httpx

    response = page.request.get(server + "/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy
    assert response.headers["x-content-type-options"] == "nosniff" and "referrer-policy" in response.headers
    html = response.text()
    assert "<script type=\"module\" src=\"/ui/app.js\"></script>" in html and html.count("<script") == 1  # no inline script
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    api = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert "default-src 'self'" in api.headers["content-security-policy"]


def test_a_recording_and_a_photo_from_the_browser(page, loaded):
    """Chromium's fake devices: a tone from the microphone, a test pattern from the camera."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    set_options(page, max_tokens="6")
    page.get_by_role("button", name="Record").click()
    expect(page.get_by_role("button", name="Stop recording")).to_be_visible()
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Stop recording").click()
    expect(page.get_by_label("Attachments")).to_contain_text("recording-")
    page.get_by_role("button", name="Camera").click()
    page.get_by_role("button", name="Take photo").click()
    expect(page.get_by_label("Attachments")).to_contain_text("camera.jpg")
    send(page, "what was that?")
    _, source = last_reply(page)
    sound, photo, text = bodies[-1]["messages"][0]["content"]
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(sound["input_audio"]["data"])), dtype="float32")
    assert sound["input_audio"]["format"] == "wav" and rate == 16000 and samples.ndim == 1 and 0.5 < len(samples) / rate < 30
    assert np.abs(samples).max() > 0.01  # the fake microphone's tone, not silence
    header, data = photo["image_url"]["url"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    messages = [{"role": "user", "content": [{"type": "audio", "audio": samples}, {"type": "image", "image": image},
                                             {"type": "text", "text": "what was that?"}]}]
    assert source == greedy(loaded, messages, 6)


def test_tool_calls_show_and_take_results(page, loaded):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                               "parameters": {"type": "object", "properties": {"word": {"enum": ["cat", "dog"]}},
                                                              "required": ["word"]}}}]
    set_options(page, max_tokens="80", tools=tools, tool_choice="required")
    send(page, "look up cat")
    reply = page.get_by_role("article").last
    expect(reply.get_by_role("textbox", name="Result of lookup").first).to_be_visible()
    expected = greedy(loaded, [{"role": "user", "content": "look up cat"}], 80, tools=tools, tool_choice="required")
    assert expected.tool_calls
    shown = [call.text_content() for call in reply.locator(".tool-call code").all()]
    assert shown == [f"{c['function']['name']}({c['function']['arguments']})" for c in expected.tool_calls]
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    reply.get_by_role("textbox", name="Result of lookup").first.fill("a small animal")
    reply.get_by_role("button", name="Send result").first.click()
    expect(page.get_by_role("group", name="Tool result")).to_have_text("Result of lookup: a small animal")
    expect(page.get_by_role("article")).to_have_count(2)
    expect(page.get_by_role("article").last.locator(".stats")).not_to_have_text("")
    user, assistant, result = bodies[-1]["messages"]
    assert [c["function"] for c in assistant["tool_calls"]] == [c["function"] for c in expected.tool_calls]
    assert result == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "a small animal"}
    again = greedy(loaded, [user, assistant, result], 80, tools=tools, tool_choice="required")
    shown = [call.text_content() for call in page.get_by_role("article").last.locator(".tool-call code").all()]
    assert shown == [f"{c['function']['name']}({c['function']['arguments']})" for c in again.tool_calls]


def test_screenshot_of_a_conversation_with_an_image(page, tmp_path):
    """Saved for the README (MLX_GEMMA3N_SCREENSHOT=path writes it there)."""
    from PIL import ImageDraw

    picture = Image.new("RGB", (320, 200), (135, 190, 235))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 140, 320, 200), fill=(70, 150, 70))
    draw.ellipse((230, 25, 290, 85), fill=(250, 210, 60))
    draw.polygon([(40, 140), (110, 60), (180, 140)], fill=(120, 110, 100))
    picture.save(tmp_path / "hills.png")
    set_options(page, max_tokens="24")
    page.get_by_label("Attach", exact=True).set_input_files([tmp_path / "hills.png"])
    send(page, "What is in this picture?")
    reply, _ = last_reply(page)
    reply.get_by_role("button", name="Show the reply's source").click()  # hidden again
    target = os.environ.get("MLX_GEMMA3N_SCREENSHOT") or str(tmp_path / "chat.png")
    page.screenshot(path=target)
    assert Image.open(target).size == (1280, 800)


def test_no_ui_serves_no_page():
    from starlette.testclient import TestClient

    from mlx_gemma3n.server.app import Security, create_app

    headers = {"Host": "127.0.0.1:8080"}
    with_page, without = TestClient(create_app(None, None, Security())), TestClient(create_app(None, None, Security(), page=False))
    assert with_page.get("/", headers=headers).status_code == 200
    assert with_page.get("/ui/app.js", headers=headers).headers["content-type"].startswith("text/javascript")
    assert without.get("/", headers=headers).status_code == 404
    assert without.get("/ui/app.js", headers=headers).status_code == 404
