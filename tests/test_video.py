"""Video parts, on videos made here with PyAV (64 x 48 frames, each a solid colour of its own, so a
sampled frame tells which source frame it is; sound with tones at known times): which frames are
sampled at which times (the fps rule, the max_frames rule), their pixels, the sound track's samples;
a video part equals its `video_parts` given as parts in the prompt, in the CLI (--video), the example
and the server (video_url); each bad input is a one-line error or a 400 / 413."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from mlx_gemma3n import generate, load
from mlx_gemma3n.errors import Gemma3nError
from mlx_gemma3n.generate import stream_generate
from mlx_gemma3n.inputs.audio_files import SoundTooLong
from mlx_gemma3n.inputs.av_media import INSTALL_HINT
from mlx_gemma3n.inputs.video import clock, load_video
from mlx_gemma3n.server.errors import ApiError
from mlx_gemma3n.server.media import MediaLimits, video_from_url

from helpers import running_server
from videos import HEIGHT, PALETTE, WIDTH, Unseekable, tone, write_video

RATE = 16000
COLOUR_TOLERANCE = 16  # lossy codecs move a solid colour by a few levels
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def source_frame(image) -> int:
    """Which source frame a decoded frame is: the palette colour its mean is within tolerance of."""
    mean = np.asarray(image).reshape(-1, 3).mean(axis=0)
    matches = [i for i, colour in enumerate(PALETTE) if np.abs(mean - colour).max() <= COLOUR_TOLERANCE]
    assert len(matches) == 1, f"a frame of mean colour {mean} is no source frame"
    assert np.abs(np.asarray(image).astype(int) - PALETTE[matches[0]]).max() <= COLOUR_TOLERANCE  # solid, not just on average
    return matches[0]


def sampled(video) -> list[tuple[float, int]]:
    return [(round(seconds, 3), source_frame(image)) for seconds, image in video.frames]


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_256):
    return load(tiny_ckpt_256.path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    files = {
        "silent_5s_4fps": (5, 4, None, {}),
        "silent_12s_2fps": (12, 2, None, {}),
        "silent_3s_2fps": (3, 2, None, {}),
        "aac_stereo_6s": (6, 2, tone(6, 44100, [(1, 2.5), (4, 5)]), {"channels": 2}),
        "pcm_mono_3s": (3, 2, tone(3, RATE, [(0.5, 1.5)]), {"rate": RATE, "audio_codec": "pcm_s16le", "container": "matroska"}),
        "six_seconds_of_sound": (6, 0.5, tone(6, RATE, [(0, 6)]), {"rate": RATE}),
        "long_sound_35s": (35, 0.25, tone(35, RATE, [(0, 35)], 300.0), {"rate": RATE}),
    }
    paths = {}
    for name, (seconds, fps, sound, options) in files.items():
        paths[name] = folder / f"{name}.{'mkv' if options.get('container') == 'matroska' else 'mp4'}"
        write_video(paths[name], seconds, fps, sound, **options)
    with av.open(str(folder / "sound_only.m4a"), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(1, RATE, [(0, 1)])[None, :], format="flt", layout="mono")
        frame.sample_rate = RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    paths["sound_only"] = folder / "sound_only.m4a"
    return paths


@pytest.mark.parametrize("name, fps, max_frames, expected", [
    # 1 fps over 5 s: 5 frames, one a second (the source has 4 a second)
    ("silent_5s_4fps", 1.0, 8, [(0.0, 0), (1.0, 4), (2.0, 8), (3.0, 12), (4.0, 16)]),
    # 2 fps would give 10: 4 frames spread evenly instead, every 5 / 4 s
    ("silent_5s_4fps", 2.0, 4, [(0.0, 0), (1.25, 5), (2.5, 10), (3.75, 15)]),
    # 1 fps over 12 s would give 12: 8 every 1.5 s
    ("silent_12s_2fps", 1.0, 8, [(i * 1.5, i * 3) for i in range(8)]),
    # 5 fps on a 2 fps source, 8 at most (every 3/8 s): the frame on screen at each time, each once
    ("silent_3s_2fps", 5.0, 8, [(i * 0.5, i) for i in range(6)]),
])
def test_frames_are_sampled_at_up_to_fps_and_at_most_max_frames(videos, name, fps, max_frames, expected):
    video = load_video(videos[name], fps, max_frames)
    assert sampled(video) == expected
    assert video.audio is None
    assert all(image.mode == "RGB" and image.size == (WIDTH, HEIGHT) for _, image in video.frames)


def test_the_bytes_of_a_file_and_a_file_without_a_duration_in_its_header(videos):
    from_path, from_bytes = load_video(videos["aac_stereo_6s"]), load_video(videos["aac_stereo_6s"].read_bytes())
    assert sampled(from_path) == sampled(from_bytes) == [(float(i), 2 * i) for i in range(6)]
    np.testing.assert_array_equal(from_path.audio, from_bytes.audio)
    for (_, a), (_, b) in zip(from_path.frames, from_bytes.frames):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    stream = Unseekable()
    write_video(stream, 10, 2, tone(10, 48000, [(0, 10)]), rate=48000, codec="libvpx", audio_codec="libopus", container="webm")
    with av.open(io.BytesIO(bytes(stream.data))) as probe:
        assert probe.duration is None and probe.streams.video[0].duration is None
    webm = load_video(bytes(stream.data), 1.0, 4)
    assert sampled(webm) == [(0.0, 0), (2.5, 5), (5.0, 10), (7.5, 15)]  # spread over all 10 s
    assert abs(webm.audio.size - 10 * RATE) < 0.05 * RATE


def test_the_sound_track_is_the_tone(videos):
    """AAC (stereo, 44.1 kHz): its loudness in 50 ms windows is the tone's, and its length the video's;
    PCM (mono, 16 kHz): the very samples, to 16-bit precision."""
    audio = load_video(videos["aac_stereo_6s"]).audio
    assert audio.dtype == np.float32 and abs(audio.size - 6 * RATE) < 0.05 * RATE
    window = RATE // 20
    loudness = np.sqrt(np.mean(audio[: audio.size // window * window].reshape(-1, window) ** 2, axis=1))
    middles = (np.arange(loudness.size) + 0.5) / 20
    on = ((middles > 1.1) & (middles < 2.4)) | ((middles > 4.1) & (middles < 4.9))
    off = ~(((middles > 0.9) & (middles < 2.6)) | ((middles > 3.9) & (middles < 5.1)))
    assert np.all(np.abs(loudness[on] - 0.5 / np.sqrt(2)) < 0.05), loudness[on]  # channels averaged, not summed
    assert np.all(loudness[off] < 0.01), loudness[off]
    pcm = load_video(videos["pcm_mono_3s"]).audio
    np.testing.assert_allclose(pcm, tone(3, RATE, [(0.5, 1.5)]), atol=1 / 32768)
    with pytest.raises(SoundTooLong, match="longer than 2 s"):  # a small file may hold hours: decoding stops
        load_video(videos["aac_stereo_6s"], max_sound_seconds=2)
    assert load_video(videos["aac_stereo_6s"], max_sound_seconds=7).audio.size == audio.size


def test_an_array_of_frames_is_taken_at_the_fps_given():
    frames = np.stack([np.full((HEIGHT, WIDTH, 3), PALETTE[i], dtype=np.uint8) for i in range(20)])
    all_of_them = load_video(frames, fps=4.0, max_frames=32)
    assert sampled(all_of_them) == [(i / 4, i) for i in range(20)] and all_of_them.audio is None
    assert sampled(load_video(frames, fps=4.0, max_frames=5)) == [(float(i), 4 * i) for i in range(5)]
    np.testing.assert_array_equal(np.asarray(all_of_them.frames[3][1]), frames[3])


def test_video_parts_layout(loaded, videos):
    _, processor = loaded
    parts = processor.video_parts(videos["aac_stereo_6s"], fps=0.5)
    assert [part["type"] for part in parts] == ["text", "image"] * 3 + ["audio"]
    assert [part["text"] for part in parts if part["type"] == "text"] == ["Frame at 0:00:", "Frame at 0:02:", "Frame at 0:04:"]
    assert [source_frame(part["image"]) for part in parts if part["type"] == "image"] == [0, 4, 8]
    np.testing.assert_array_equal(parts[-1]["audio"], load_video(videos["aac_stereo_6s"]).audio)
    assert [part["type"] for part in processor.video_parts(videos["silent_3s_2fps"])] == ["text", "image"] * 3
    assert [clock(s) for s in (0, 3, 59.96, 75.5, 3725)] == ["0:00", "0:03", "1:00", "1:15.5", "1:02:05"]


def prompts_equal(a, b) -> None:
    assert a.ids == b.ids
    assert len(a.images) == len(b.images) and len(a.audio) == len(b.audio)
    for x, y in zip(a.images, b.images):
        np.testing.assert_array_equal(x, y)
    for (features, valid), (features_b, valid_b) in zip(a.audio, b.audio):
        np.testing.assert_array_equal(features, features_b)
        np.testing.assert_array_equal(valid, valid_b)


def test_a_video_part_is_its_video_parts(loaded, videos):
    _, processor = loaded
    question = {"type": "text", "text": "What happens?"}
    for name, options, times in (("aac_stereo_6s", {}, range(6)), ("silent_12s_2fps", {"fps": 2.0, "max_frames": 3}, (0, 4, 8))):
        as_video = processor.prepare([{"role": "user", "content": [{"type": "video", "video": str(videos[name]), **options}, question]}])
        as_parts = processor.prepare([{"role": "user", "content": processor.video_parts(videos[name], **options) + [question]}])
        prompts_equal(as_video, as_parts)
        assert len(as_video.images) == len(times) and len(as_video.audio) == (1 if name == "aac_stereo_6s" else 0)
        text = processor.decode(as_video.ids)
        positions = [text.index(f"Frame at 0:{t:02d}:") for t in times]
        assert positions == sorted(positions)
    # 35 s of sound: two clips, as an audio part of that length gives
    long = processor.prepare([{"role": "user", "content": [{"type": "video", "video": str(videos["long_sound_35s"])}, question]}])
    sound = load_video(videos["long_sound_35s"]).audio
    clips = processor.split_audio(sound)
    assert len(clips) == len(long.audio) == 2
    frames = processor.video_parts(videos["long_sound_35s"])[:-1]
    prompts_equal(long, processor.prepare([{"role": "user", "content": frames + [{"type": "audio", "audio": sound}, question]}]))


def test_a_fine_tuning_line_with_a_video_trains_on_its_frames_and_sound(loaded, videos):
    from mlx_gemma3n.tuner.datasets import Tokenizer

    _, processor = loaded
    answer = {"role": "assistant", "content": "A red screen turns blue."}
    video = {"messages": [{"role": "user", "content": [{"type": "video", "video": str(videos["aac_stereo_6s"])}]}, answer]}
    parts = {"messages": [{"role": "user", "content": processor.video_parts(videos["aac_stereo_6s"])}, answer]}
    tokenizer = Tokenizer(processor)
    as_video, as_parts = tokenizer.example(1, video), tokenizer.example(1, parts)
    assert (as_video.ids, as_video.labels) == (as_parts.ids, as_parts.labels)
    assert len(as_video.images) == 6 and len(as_video.audio) == 1
    prompts_equal(as_video, as_parts)
    assert processor.decode([t for t, label in zip(as_video.ids, as_video.labels) if label != -100]).startswith("A red screen")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_gemma3n.generate", *args], capture_output=True, text=True, timeout=600)


def test_cli_video_equals_the_api_with_its_parts(tiny_ckpt_256, loaded, videos):
    model, processor = loaded
    path = videos["aac_stereo_6s"]
    parts = processor.video_parts(path, fps=0.5, max_frames=2)
    assert [part["text"] for part in parts if part["type"] == "text"] == ["Frame at 0:00:", "Frame at 0:03:"]
    expected = generate(model, processor, [{"role": "user", "content": parts + [{"type": "text", "text": "What?"}]}],
                        max_tokens=8, temperature=0.0)
    result = cli("--model", str(tiny_ckpt_256.path), "--video", str(path), "--video-fps", "0.5", "--max-frames", "2",
                 "--prompt", "What?", "--max-tokens", "8", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_example_asks_about_a_video(tiny_ckpt_256, loaded, videos):
    model, processor = loaded
    path = videos["aac_stereo_6s"]
    parts = processor.video_parts(path, fps=1.0, max_frames=3)
    expected = generate(model, processor, [{"role": "user", "content": parts + [{"type": "text", "text": "What?"}]}],
                        max_tokens=8, temperature=0.0)
    result = subprocess.run([sys.executable, str(EXAMPLES / "video_question.py"), "--model", str(tiny_ckpt_256.path), "--video", str(path),
                             "--question", "What?", "--max-frames", "3", "--max-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "shown: Frame at 0:00, Frame at 0:02, Frame at 0:04 and its sound" in result.stderr


def test_bad_videos_are_one_line_errors(tmp_path, videos, monkeypatch):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    truncated = videos["aac_stereo_6s"].read_bytes()[:2000]  # an mp4 whose index (at the end) is cut off
    empty_video = tmp_path / "no_frames.mkv"
    with av.open(str(empty_video), "w") as out:  # a video stream with no frame in it, and a second of sound
        video = out.add_stream("mpeg4", rate=2)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = out.add_stream("aac", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(1, RATE, [(0, 1)])[None, :], format="flt", layout="mono")
        frame.sample_rate = RATE
        out.mux(sound.encode(frame))
        out.mux(sound.encode())
    cases = [
        (tmp_path / "missing.mp4", f"video file {tmp_path / 'missing.mp4'} does not exist"),
        (tmp_path, f"video file {tmp_path} is a folder"),
        (garbage, f"cannot read video file {garbage}: Invalid data found when processing input"),
        (truncated, "cannot read the video: Invalid data found when processing input"),
        (b"", "cannot read the video: Invalid data found when processing input"),
        (videos["sound_only"], f"video file {videos['sound_only']} has no video stream"),
        (empty_video, f"video file {empty_video} has no frames"),
        (np.zeros((0, HEIGHT, WIDTH, 3), np.uint8), "a video array must be (frames, height, width, 3) uint8"),
        (np.zeros((2, HEIGHT, WIDTH, 3), np.float32), "a video array must be (frames, height, width, 3) uint8"),
        (12, "cannot read a video from a int"),
        ("https://example.com/clip.mp4", "video URLs are not fetched (https://example.com/clip.mp4)"),
    ]
    for source, message in cases:
        with pytest.raises(Gemma3nError) as error:
            load_video(source)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
    for options, message in (({"fps": 0}, "frame rate must be > 0"), ({"max_frames": 0}, "max_frames must be an integer >= 1")):
        with pytest.raises(Gemma3nError, match=message):
            load_video(videos["silent_3s_2fps"], **options)
    with pytest.raises(Gemma3nError, match="over the limit of 1000"):
        load_video(videos["silent_3s_2fps"], max_pixels=1000)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(Gemma3nError) as error:
        load_video(videos["silent_3s_2fps"])
    assert str(error.value) == INSTALL_HINT == "video needs PyAV: pip install 'mlx-gemma3n[video]'"


def test_cli_bad_video_is_one_line(tiny_ckpt_256, tmp_path):
    missing = tmp_path / "missing.mp4"
    result = cli("--model", str(tiny_ckpt_256.path), "--video", str(missing), "--prompt", "What?", "--max-tokens", "2")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"error: video file {missing} does not exist"]
    result = cli("--model", str(tiny_ckpt_256.path), "--video", str(missing), "--video-fps", "0", "--prompt", "What?")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == ["error: --video-fps must be > 0, got 0.0"]


# --- the server: video_url parts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_ckpt_256, tmp_path_factory):
    arguments = ["--model", str(tiny_ckpt_256.path), "--max-images", "4", "--max-audio-seconds", "5"]
    with running_server(arguments, tmp_path_factory.mktemp("video_server_log") / "stderr.txt") as url:
        yield url


def video_url(path: Path, mime: str = "video/mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()}}


def post(server, tiny_ckpt_256, messages, max_tokens: int = 2) -> httpx.Response:
    body = {"model": tiny_ckpt_256.path.name, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=600)


def test_server_video_url_equals_chat_with_its_parts(server, tiny_ckpt_256, loaded, videos):
    model, processor = loaded
    path = videos["pcm_mono_3s"]  # 3 frames (0, 1, 2 s) and 3 s of sound, within the server's limits
    question = {"type": "text", "text": "What happens?"}
    response = post(server, tiny_ckpt_256, [{"role": "user", "content": [video_url(path, "video/x-matroska"), question]}], 12)
    assert response.status_code == 200, response.text
    parts = processor.video_parts(path)
    assert sum(part["type"] == "image" for part in parts) == 3
    responses = list(stream_generate(model, processor, [{"role": "user", "content": parts + [question]}], 12, temperature=0.0))
    reply = response.json()
    assert reply["choices"][0]["message"]["content"] == "".join(r.text for r in responses)
    assert reply["usage"]["completion_tokens"] == len(responses)
    assert reply["usage"]["prompt_tokens"] == len(processor.prepare([{"role": "user", "content": parts + [question]}]).ids)


def test_server_bad_videos_get_400_or_413_naming_the_part(server, tiny_ckpt_256, videos):
    param = "messages[0].content[0].video_url.url"
    cases = [
        (video_url(videos["silent_5s_4fps"]), 400, "a request takes at most 4 images"),  # 5 frames
        (video_url(videos["six_seconds_of_sound"]), 413, "sound is longer than 5 s"),  # 3 frames, 6 s of sound: decoding stops
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()}}, 400,
         f"{param}: cannot read the video: Invalid data found"),
        (video_url(videos["sound_only"]), 400, f"{param}: the video has no video stream"),
        (video_url(videos["silent_3s_2fps"], "image/png"), 400, "videos must be video/mp4"),
        ({"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}}, 400, "remote video URLs are off"),
        ({"type": "video_url", "video_url": {"url": "/etc/passwd"}}, 400, "local paths are refused"),
        ({"type": "video_url", "video_url": {}}, 400, "video_url.url must be a string"),
    ]
    for part, status, message in cases:
        response = post(server, tiny_ckpt_256, [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}])
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in error["message"] and "\n" not in error["message"]
        assert error["param"] in (param, "messages[0].content[0]")
    two_videos = [video_url(videos["silent_3s_2fps"]), video_url(videos["silent_3s_2fps"])]  # 3 + 3 frames
    response = post(server, tiny_ckpt_256, [{"role": "user", "content": two_videos}])
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].content[1]"
    assistant = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [video_url(videos["silent_3s_2fps"])]}]
    response = post(server, tiny_ckpt_256, assistant)
    assert response.status_code == 400 and "only user messages" in response.json()["error"]["message"]


def test_remote_videos_are_fetched_only_when_allowed_and_from_public_addresses(videos):
    data, asked = videos["aac_stereo_6s"].read_bytes(), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/clip.mp4"
    try:
        for limits, message in ((MediaLimits(), "remote video URLs are off"), (MediaLimits(allow_remote=True), "non-public")):
            with pytest.raises(ApiError) as refused:
                video_from_url(url, "url", limits, RATE)
            assert refused.value.status == 400 and message in refused.value.message
        assert asked == []
        fetched = video_from_url(url, "url", MediaLimits(allow_remote=True, allow_private=True), RATE)
        assert asked == ["/clip.mp4"]
    finally:
        httpd.shutdown()
    assert sampled(fetched) == sampled(load_video(videos["aac_stereo_6s"]))
    np.testing.assert_array_equal(fetched.audio, load_video(videos["aac_stereo_6s"]).audio)


def test_the_servers_pixel_cap_covers_video_frames(videos):
    url = video_url(videos["silent_3s_2fps"])["video_url"]["url"]
    assert len(video_from_url(url, "url", MediaLimits(max_image_pixels=WIDTH * HEIGHT), RATE).frames) == 3
    with pytest.raises(ApiError) as refused:
        video_from_url(url, "url", MediaLimits(max_image_pixels=WIDTH * HEIGHT - 1), RATE)
    assert refused.value.status == 400
    assert refused.value.message == f"url: the video's frames are {WIDTH} x {HEIGHT} pixels, over the limit of {WIDTH * HEIGHT - 1}"
