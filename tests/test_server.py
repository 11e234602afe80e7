"""The OpenAI-compatible server, run for real (`python -m mlx_gemma3n.server` on a free 127.0.0.1 port)
on the tiny checkpoint and driven by the `openai` package: greedy replies equal `generate`'s (which the
generation tests hold equal to Transformers'), alone and under concurrent load, text, image and
audio; prompt-prefix reuse; and each bad input's status code."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import numpy as np
import pytest
import soundfile
from openai import OpenAI
from PIL import Image

from mlx_gemma3n import load
from mlx_gemma3n.generate import stream_generate

from helpers import SERVER_STARTUP_DEADLINE_S, raw_http, running_server
from videos import write_sound

API_KEY = "test-key"
MAX_REQUEST_BYTES = 1 << 20


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server_media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "cat.png")
    t = np.arange(16000) / 16000
    clip = (0.4 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    soundfile.write(folder / "clip.wav", clip, 16000)
    return folder / "cat.png", folder / "clip.wav"


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt_256):
    return tiny_ckpt_256.path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    arguments = ["--model", str(checkpoint), "--api-key", API_KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES),
                 "--max-images", "2", "--max-audio-seconds", "3", "--max-batch", "8"]
    with running_server(arguments, tmp_path_factory.mktemp("server_log") / "stderr.txt") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def model_id(checkpoint):
    return checkpoint.name


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint)


def reference(loaded, prompt, max_tokens: int) -> tuple[str, int]:
    """(text, tokens generated) of the single-request API, greedy."""
    model, processor = loaded
    responses = list(stream_generate(model, processor, prompt, max_tokens, temperature=0.0))
    return "".join(r.text for r in responses), len(responses)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def audio_part(path, audio_format: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": audio_format}}


def chat(client, model_id, messages, max_tokens, stream=False, **extra):
    if not stream:
        reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens, temperature=0, **extra)
        return reply.choices[0].message.content, reply.usage
    chunks = list(client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate(client, model_id, loaded, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea"}]
    text, usage = chat(client, model_id, messages, 24, stream)
    expected, tokens = reference(loaded, messages, 24)
    assert (text, usage.completion_tokens) == (expected, tokens)
    assert usage.prompt_tokens == len(loaded[1].prepare(messages).ids)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_takes_raw_text_and_equals_generate(client, model_id, loaded, stream):
    prompt = "Once upon a time"
    expected, tokens = reference(loaded, loaded[1].encode(prompt), 20)
    if stream:
        chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
    else:
        reply = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0)
        text = reply.choices[0].text
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(loaded[1].encode(prompt)), tokens)
    assert text == expected


def test_image_data_url_and_input_audio_equal_the_api_on_the_same_files(client, model_id, loaded, media):
    image, clip = media
    sent = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, audio_part(clip),
        {"type": "text", "text": "What is this?"}]}]
    local = [{"role": "user", "content": [
        {"type": "image", "image": str(image)}, {"type": "audio", "audio": str(clip)},
        {"type": "text", "text": "What is this?"}]}]
    text, usage = chat(client, model_id, sent, 16)
    assert (text, usage.completion_tokens) == reference(loaded, local, 16)


def test_m4a_and_webm_input_audio_equal_the_api_on_the_same_files(client, model_id, loaded, media, tmp_path):
    """What libsndfile does not read (a Voice Memo's AAC, a browser's Opus recording), decoded by FFmpeg."""
    samples, rate = soundfile.read(media[1], dtype="float32")
    for audio_format, codec in (("m4a", "aac"), ("webm", "libopus")):
        path = tmp_path / f"memo.{audio_format}"
        write_sound(str(path), samples, rate, codec, "mp4" if audio_format == "m4a" else "webm")
        sent = [{"role": "user", "content": [audio_part(path, audio_format), {"type": "text", "text": "What is this?"}]}]
        local = [{"role": "user", "content": [{"type": "audio", "audio": str(path)}, {"type": "text", "text": "What is this?"}]}]
        text, usage = chat(client, model_id, sent, 8)
        assert (text, usage.completion_tokens) == reference(loaded, local, 8)


def test_concurrent_clients_each_get_their_single_request_reply(client, model_id, loaded, media):
    image, clip = media
    words = "the quick brown fox jumps over the lazy dog ".split()
    cases = []
    for i in range(40):
        text = " ".join(words[: 1 + (i * 7) % len(words)] * (1 + i % 5)) + f" #{i}"
        if i % 10 == 3:
            sent = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}]
            local = [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]
        elif i % 10 == 8:
            sent, local = [audio_part(clip), {"type": "text", "text": text}], [{"type": "audio", "audio": str(clip)}, {"type": "text", "text": text}]
        else:
            sent = local = text
        cases.append(([{"role": "user", "content": sent}], [{"role": "user", "content": local}], 4 + (i * 3) % 17))
    expected = [reference(loaded, local, max_tokens) for _, local, max_tokens in cases]

    def one_client(start: int):
        return [(i, chat(client, model_id, cases[i][0], cases[i][2], stream=i % 2 == 0)) for i in range(start, 40, 8)]

    with ThreadPoolExecutor(8) as pool:
        results = [item for items in pool.map(one_client, range(8)) for item in items]
    assert sorted(i for i, _ in results) == list(range(40))
    for i, (text, usage) in results:
        assert (text, usage.completion_tokens) == expected[i], f"request {i}"


def test_same_ids_and_different_audio_in_one_batch(loaded, checkpoint):
    """Two requests whose token ids are the same (an audio clip is 188 placeholders whatever its
    length) and whose audio differs, in the batch together, the second finishing first: each gets its
    own reply (the engine once compared their arrays to find the finished one, and failed)."""
    import queue

    from mlx_gemma3n.decoding.sampling import SamplingParams
    from mlx_gemma3n.server.engine import Engine, Job
    from mlx_gemma3n.server.requests import GenerationRequest

    model, processor = loaded
    rng = np.random.default_rng(5)
    engine, cases = Engine(lambda: load(checkpoint)[0], processor, max_batch=2), []  # loaded in its thread
    for seconds, max_tokens in ((2.0, 12), (1.0, 2)):
        clip = (0.3 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        messages = [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "What is said?"}]}]
        request = GenerationRequest(processor.prepare(messages), ((), (f"clip of {seconds} s",)), max_tokens, SamplingParams(temperature=0.0))
        deltas = queue.Queue()
        engine.submit(Job(request, deltas.put))
        cases.append((deltas, messages, max_tokens))
    engine.start()  # both wait in the queue, so they join the batch together
    try:
        for deltas, messages, max_tokens in cases:
            text = []
            while not text or text[-1].finish_reason is None:
                text.append(deltas.get(timeout=600))
                assert text[-1].error is None, text[-1].error
            assert ("".join(d.text for d in text), text[-1].usage.completion_tokens) == reference(loaded, messages, max_tokens)
    finally:
        engine.stop()


def test_resent_chat_prefills_only_the_new_turn(client, model_id, loaded):
    history = [{"role": "user", "content": " ".join(f"line {i} of a long story about cats" for i in range(50))}]
    assert len(loaded[1].prepare(history).ids) >= 1000
    first, first_usage = chat(client, model_id, history, 8)
    resent = history + [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    text, usage = chat(client, model_id, resent, 8)
    assert usage.prompt_tokens_details.cached_tokens >= 1000
    assert usage.prompt_tokens_details.cached_tokens == first_usage.prompt_tokens
    assert (text, usage.completion_tokens) == reference(loaded, resent, 8)


def test_cached_prefix_never_crosses_different_media(client, model_id, loaded, media, tmp_path):
    image, _ = media
    other = tmp_path / "other.png"
    Image.fromarray(np.full((48, 64, 3), 200, dtype=np.uint8)).save(other)
    for path in (image, other):
        sent = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}}, {"type": "text", "text": "Same words"}]}]
        text, usage = chat(client, model_id, sent, 6)
        assert (text, usage.completion_tokens) == reference(loaded, [{"role": "user", "content": [
            {"type": "image", "image": str(path)}, {"type": "text", "text": "Same words"}]}], 6)


def test_json_object_response_format_is_json(client, model_id):
    reply = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Give JSON"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False}}},
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"  # compact JSON ends in the tokens its content needs
    assert text in ('{"a": true}', '{"a": false}')


def test_stop_sequence_is_never_emitted(client, model_id, loaded):
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    expected, _ = reference(loaded, messages, 24)
    stop = expected[5:8]
    text, _ = chat(client, model_id, messages, 24, stop=[stop])
    assert text == expected[: expected.index(stop)]


def test_logprobs(client, model_id):
    reply = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries)  # greedy: the top token


def post(server, path, body, headers=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=300)


def user(content):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


BAD_REQUESTS = [
    (b"{not json", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].tool_call_id"),
    ({"messages": "hi"}, 400, "messages"),
    ({**user("hi"), "n": 2}, 400, "n"),
    ({**user("hi"), "tools": []}, 400, "tools"),
    ({**user("hi"), "frobnicate": 1}, 400, "frobnicate"),
    ({**user("hi"), "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    (user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]), 400, "messages[0].content[0].image_url.url"),
    (user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]), 400, "messages[0].content[0].image_url.url"),
    (user([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]), 400, "messages[0].content[0].image_url.url"),
    (user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), 400, "messages[0].content[0].image_url.url"),
    (user([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]), 400, "messages[0].content[0].image_url.url"),
    (user([{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"noise").decode(), "format": "wav"}}]), 400,
     "messages[0].content[0].input_audio.data"),
    (user([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}]), 400, "messages[0].content[0].input_audio.format"),
    (user([{"type": "video", "video": "x"}]), 400, "messages[0].content[0]"),
]


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS)
def test_bad_chat_requests_get_400_naming_the_field(server, model_id, body, status, param):
    if isinstance(body, dict):
        body = {"model": model_id, **body}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param


def test_media_caps(server, model_id, media, tmp_path):
    image, _ = media
    three_images = [{"type": "image_url", "image_url": {"url": data_url(image)}}] * 3
    response = post(server, "/v1/chat/completions", {"model": model_id, **user(three_images)})
    assert response.status_code == 400 and "at most 2 images" in response.json()["error"]["message"]
    long_clip = tmp_path / "long.wav"
    soundfile.write(long_clip, np.zeros(16000 * 4, dtype=np.float32), 16000)
    response = post(server, "/v1/chat/completions", {"model": model_id, **user([audio_part(long_clip)])})
    error = response.json()["error"]  # decoding stops at the cap: a small file may hold hours
    assert response.status_code == 413 and error["param"] == "messages[0].content[0].input_audio.data", error
    assert error["message"].endswith("the wav file's sound is longer than 3 s (the server's --max-audio-seconds)"), error
    soundfile.write(long_clip.with_name("two.wav"), np.zeros(16000 * 2, dtype=np.float32), 16000)
    two = user([audio_part(long_clip.with_name("two.wav"))] * 2)
    response = post(server, "/v1/chat/completions", {"model": model_id, **two})
    assert response.status_code == 413 and "at most 3 s of audio" in response.json()["error"]["message"]  # the parts together


def test_model_must_be_served_and_a_path_loads_nothing(server, client, checkpoint, model_id):
    for name in (str(checkpoint), "google/gemma-3n-E2B-it", "../" + model_id):
        response = post(server, "/v1/chat/completions", {"model": name, **user("hi")})
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert [m.id for m in client.models.list()] == [model_id]


def test_auth_routes_and_completion_prompt_type(server, model_id):
    assert post(server, "/v1/models", b"", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}/v1/models", timeout=60).status_code == 401
    assert httpx.get(f"{server}/v1/nowhere", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).status_code == 404
    response = post(server, "/v1/completions", {"model": model_id, "prompt": [1, 2, 3]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_body_over_the_cap_is_413_before_it_is_read(server):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.removeprefix('http://')}\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\n")
    # a claimed length far over the cap, and no body sent: answered at once
    answer = raw_http(server, (head + f"Content-Length: {100 * MAX_REQUEST_BYTES}\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413")
    # a chunked body (no length) counted as it streams in
    chunk = b"x" * (256 << 10)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    answer = raw_http(server, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + body)
    assert answer.startswith(b"HTTP/1.1 413")


def test_a_client_that_leaves_mid_stream_does_not_hold_the_server(client, model_id, loaded):
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Go on forever"}], max_tokens=1500, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    assert chat(client, model_id, messages, 8)[0] == reference(loaded, messages, 8)[0]


def test_a_full_queue_answers_429(loaded):
    from mlx_gemma3n.server.engine import Engine, Job
    from mlx_gemma3n.server.errors import ApiError

    engine = Engine(lambda: loaded[0], loaded[1], max_queue=1)  # not started: nothing leaves the queue
    engine.submit(Job(None, print))
    with pytest.raises(ApiError) as refused:
        engine.submit(Job(None, print))
    assert refused.value.status == 429


def test_bf16_batch_rows_equal_their_single_request_output(checkpoint):
    """The server loads `batched`: on CPU a bf16 tied table stays bf16 (its matmul batches; the float32
    one costs B rows B times one), and each row of a batched bf16 step is the one it gets alone."""
    import threading

    from mlx_gemma3n.inputs.processor import Processor
    from mlx_gemma3n.server.engine import Engine, Job
    from mlx_gemma3n.server.media import MediaLimits
    from mlx_gemma3n.server.requests import RequestContext, parse_completion
    from mlx_gemma3n.weights.loader import load_model

    processor = Processor(checkpoint)
    engine = Engine(lambda: load_model(checkpoint, dtype="bfloat16", batched=True), processor, max_batch=4)
    model = engine.start()
    assert model.language_model.embed_tokens.weight.dtype == mx.bfloat16
    context = RequestContext(processor, "m", (), MediaLimits(), 4096, 16, None)
    prompts = ["Once upon a time", "the quick brown fox jumps over", "A", "tell me about the lazy dog and the sea"]
    replies = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def collector(i):
        def deliver(delta):
            replies[i].append(delta)
            if delta.finish_reason or delta.error:
                done[i].set()
        return deliver

    requests = [parse_completion({"model": "m", "prompt": p, "max_tokens": 12 + i, "temperature": 0}, context)
                for i, p in enumerate(prompts)]
    for i, request in enumerate(requests):
        engine.submit(Job(request, collector(i)))
    try:
        assert all(event.wait(SERVER_STARTUP_DEADLINE_S) for event in done)
    finally:
        engine.stop()
    single = load_model(checkpoint, dtype="bfloat16", batched=True)
    for i, prompt in enumerate(prompts):
        assert not any(delta.error for delta in replies[i]), replies[i][-1].error
        expected = "".join(r.text for r in stream_generate(single, processor, processor.encode(prompt), 12 + i, temperature=0.0))
        assert "".join(delta.text for delta in replies[i]) == expected, f"prompt {i}"
