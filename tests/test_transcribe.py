"""Transcription of recordings of any length: `python -m mlx_gemma3n.transcribe` run for real on the
tiny checkpoint, and the server's /v1/audio endpoints driven by the `openai` package.

A recording made here (speech-like bursts with pauses) is read in blocks and cut where
`processor.split_audio` cuts the whole array; each clip's text, transcribed in a batch, is the one the
single-request API gives that clip alone (greedy); txt, srt, vtt and json (read back by parsers of
their own formats) hold the same segments; the server answers the CLI's segments and text through
`client.audio.transcriptions.create`; silence is an empty transcript; each bad input gets its error
and leaves no file behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile
import soxr
from openai import BadRequestError, OpenAI

from mlx_gemma3n import generate
from mlx_gemma3n.inputs.audio_files import SoundTooLong, decode_audio, read_audio_blocks
from mlx_gemma3n.inputs.audio_split import ClipSplitter
from mlx_gemma3n.server.transcription import upload_blocks, upload_error
from mlx_gemma3n.transcribe.prompts import answer_text, instruction
from mlx_gemma3n.transcribe.transcriber import DEFAULT_MAX_TOKENS

from helpers import RATE, on_a_terminal, recording, running_server
from videos import Unseekable, write_sound

MAX_AUDIO_SECONDS = 120


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt_256):
    return tiny_ckpt_256.path


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """A 100 s recording at 44.1 kHz stereo (so reading resamples and downmixes), and its samples at 16 kHz."""
    samples, _ = recording(100, 7)
    samples = soxr.resample(samples, RATE, 44100).astype(np.float32)
    path = tmp_path_factory.mktemp("talk") / "talk.flac"
    soundfile.write(path, np.stack([samples, 0.5 * samples], axis=1), 44100)
    return path


def transcribe(*arguments, check=True) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "mlx_gemma3n.transcribe", *map(str, arguments)],
                         capture_output=True, text=True, timeout=900)
    if check:
        assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def transcripts(checkpoint, talk, tmp_path_factory):
    """The CLI's transcript of `talk` in each format, batched (4 clips together)."""
    folder = tmp_path_factory.mktemp("transcripts")
    written = {}
    for form in ("txt", "srt", "vtt", "json"):
        run = transcribe(talk, "--model", checkpoint, "--format", form, "--output-dir", folder)
        written[form] = (folder / f"talk.{form}").read_text(encoding="utf-8")
        written[f"{form}-stdout"] = run.stdout
    return written


def seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.replace(",", ".").split(":")
    return round(int(hours) * 3600 + int(minutes) * 60 + float(rest), 3)


def cues(text: str, header: str) -> list[dict]:
    """(start, end, text) of SubRip or WebVTT cues, read by their grammar: blocks apart by a blank line."""
    blocks = [b for b in text.removeprefix(header).split("\n\n") if b.strip()]
    found = []
    for block in blocks:
        lines = block.split("\n")
        if header == "":  # SubRip: a counter line first
            assert lines.pop(0) == str(len(found) + 1)
        start, end = re.fullmatch(r"(\S+) --> (\S+)", lines[0]).groups()
        found.append({"start": seconds(start), "end": seconds(end), "text": "\n".join(lines[1:])})
    return found


def test_the_formats_hold_the_same_segments_cut_where_the_processor_cuts(transcripts, tiny_256_loaded, talk):
    _, processor = tiny_256_loaded
    body = json.loads(transcripts["json"])
    segments = body["segments"]
    samples = decode_audio(str(talk), "talk")
    bounds = [(round(a / RATE, 3), round(b / RATE, 3)) for a, b in processor.split_audio(samples)]
    assert [(s["start"], s["end"]) for s in segments] == bounds  # no clip of the recording is silent
    assert len(bounds) >= 4 and bounds[-1][1] == round(len(samples) / RATE, 3)
    assert all(s["text"] and "\n" not in s["text"] for s in segments)
    assert body["text"] == " ".join(s["text"] for s in segments)
    assert transcripts["txt"] == "".join(s["text"] + "\n" for s in segments)
    assert transcripts["vtt"].startswith("WEBVTT\n\n")
    for form, header in (("srt", ""), ("vtt", "WEBVTT\n\n")):
        assert [(c["start"], c["end"], c["text"]) for c in cues(transcripts[form], header)] == \
               [(s["start"], s["end"], s["text"]) for s in segments]
    for segment in segments:  # printed as each finished
        assert f"{segment['start']:8.2f} -> {segment['end']:8.2f}] {segment['text']}" in transcripts["txt-stdout"]


def test_a_terminal_shows_the_audio_seconds_done_and_the_real_time_factor(checkpoint, talk, tmp_path):
    command = [sys.executable, "-m", "mlx_gemma3n.transcribe", str(talk), "--model", str(checkpoint), "--output-dir", str(tmp_path)]
    code, shown = on_a_terminal(command)
    assert code == 0, shown
    total = round(soundfile.info(str(talk)).duration)
    assert re.search(rf"talk\.flac: 100%\|[^|]*\| {total}/{total} s audio \[\d\d:\d\d<\d\d:\d\d, [\d.]+x real time\]", shown), shown
    assert "wrote" in shown and (tmp_path / "talk.txt").exists()
    piped = transcribe(talk, "--model", checkpoint, "--output-dir", tmp_path / "piped")
    assert "real time" not in piped.stderr and "wrote" in piped.stderr


def test_each_clip_of_a_batch_is_its_text_transcribed_alone(transcripts, tiny_256_loaded, talk):
    """Greedy, 4 clips decoding together: each clip's text is the single-request API's for that clip."""
    model, processor = tiny_256_loaded
    samples = decode_audio(str(talk), "talk")
    expected = []
    for start, end in processor.split_audio(samples):
        messages = [{"role": "user", "content": [{"type": "audio", "audio": samples[start:end]},
                                                 {"type": "text", "text": instruction()}]}]
        expected.append(answer_text(generate(model, processor, messages, DEFAULT_MAX_TOKENS, temperature=0.0)))
    assert [s["text"] for s in json.loads(transcripts["json"])["segments"]] == expected


def test_the_file_is_read_in_blocks_and_cut_as_the_whole_array_is(talk, tiny_256_loaded):
    _, processor = tiny_256_loaded
    blocks = list(read_audio_blocks(str(talk), "talk", RATE, block_seconds=7.0))
    assert max(len(b) for b in blocks) <= 7.1 * RATE  # never the whole file at once (the resampler carries a few ms over)
    whole = decode_audio(str(talk), "talk")
    np.testing.assert_array_equal(np.concatenate(blocks), whole)  # one resampling stream, whatever the blocks
    splitter = ClipSplitter(RATE, processor.max_clip_samples)
    cut = [(a, b) for block in np.array_split(whole, 37) for a, b, _ in splitter.push(block)]
    cut += [(a, b) for a, b, _ in splitter.finish()]
    assert cut == processor.split_audio(whole)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    arguments = ["--model", str(checkpoint), "--max-audio-seconds", str(MAX_AUDIO_SECONDS), "--max-request-bytes", str(8 << 20)]
    with running_server(arguments, tmp_path_factory.mktemp("transcribe_server") / "stderr.txt") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=600)


def test_the_openai_clients_transcription_is_the_clis(client, checkpoint, talk, transcripts):
    cli = json.loads(transcripts["json"])
    with talk.open("rb") as file:
        verbose = client.audio.transcriptions.create(model=checkpoint.name, file=file, response_format="verbose_json",
                                                     timestamp_granularities=["segment"])
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(s["start"], s["end"], s["text"]) for s in cli["segments"]]
    assert verbose.text == cli["text"] and verbose.task == "transcribe"
    assert abs(verbose.duration - cli["segments"][-1]["end"]) < 1e-3
    with talk.open("rb") as file:
        assert client.audio.transcriptions.create(model=checkpoint.name, file=file).text == cli["text"]
    with talk.open("rb") as file:
        srt = client.audio.transcriptions.create(model=checkpoint.name, file=file, response_format="srt")
    assert srt == transcripts["srt"]
    with talk.open("rb") as file:
        events = list(client.audio.transcriptions.create(model=checkpoint.name, file=file, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * len(cli["segments"]) + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == cli["text"]


def test_the_translation_endpoint_is_the_clis_translation(client, checkpoint, talk, tmp_path):
    transcribe(talk, "--model", checkpoint, "--format", "json", "--output-dir", tmp_path, "--translate-to", "en")
    cli = json.loads((tmp_path / "talk.json").read_text())
    assert cli["language"] == "en"
    with talk.open("rb") as file:
        reply = client.audio.translations.create(model=checkpoint.name, file=file, response_format="verbose_json")
    assert reply.task == "translate" and reply.language == "english"
    assert [(s.start, s.end, s.text) for s in reply.segments] == [(s["start"], s["end"], s["text"]) for s in cli["segments"]]


def test_a_browsers_webm_recording_through_the_openai_client_is_the_clis_transcript_of_it(client, checkpoint, tmp_path):
    """WebM / Opus, as a page's MediaRecorder makes it (no duration in its header; FFmpeg decodes it),
    uploaded as OpenAI's clients send it; its length for the cap comes from its packets."""
    samples, _ = recording(45, 11)
    recorder = Unseekable()
    write_sound(recorder, samples, RATE, "libopus", "webm")
    path = tmp_path / "voice.webm"
    path.write_bytes(bytes(recorder.data))
    transcribe(path, "--model", checkpoint, "--format", "json", "--output-dir", tmp_path)
    cli = json.loads((tmp_path / "voice.json").read_text())
    seconds = len(samples) / RATE
    assert len(cli["segments"]) >= 2 and cli["segments"][-1]["end"] == pytest.approx(seconds, abs=0.05)
    with path.open("rb") as file:
        verbose = client.audio.transcriptions.create(model=checkpoint.name, file=file, response_format="verbose_json")
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(s["start"], s["end"], s["text"]) for s in cli["segments"]]
    assert verbose.duration == pytest.approx(seconds, abs=0.05)


def test_silence_is_an_empty_transcript(checkpoint, client, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "quiet.wav"
    soundfile.write(path, (1e-4 * rng.standard_normal(45 * RATE)).astype(np.float32), RATE)
    transcribe(path, "--model", checkpoint, "--format", "json", "--output-dir", tmp_path)
    assert json.loads((tmp_path / "quiet.json").read_text()) == {"text": "", "segments": [], "language": None}
    with path.open("rb") as file:
        assert client.audio.transcriptions.create(model=checkpoint.name, file=file).text == ""


def test_bad_inputs_get_one_line_errors_and_leave_no_file(checkpoint, talk, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(64)))
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), RATE)
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "missing.wav", "--model", checkpoint), "does not exist"),
        ((corrupt, "--model", checkpoint, "--output-dir", out), "cannot read"),
        ((empty, "--model", checkpoint, "--output-dir", out), "has no samples"),
        ((talk, "--model", checkpoint, "--format", "docx"), "unknown --format 'docx'"),
        ((talk, "--model", tmp_path / "no-model"), "no-model"),
    ]
    for arguments, message in cases:
        run = transcribe(*arguments, check=False)
        assert run.returncode == 1, run.stderr
        lines = run.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in run.stderr, run.stderr
    assert not out.exists() or list(out.iterdir()) == []


def upload(server, path: str, files: dict, data: dict | None = None, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server}{path}", files=files, data=data or {}, headers=headers or {}, timeout=600)


def test_bad_uploads_get_the_status_that_names_the_problem(server, client, checkpoint, talk, tmp_path):
    model = {"model": checkpoint.name}
    good = {"file": ("talk.flac", talk.read_bytes(), "audio/flac")}

    def refused(status, param, path="/v1/audio/transcriptions", files=good, data=None, headers=None):
        reply = upload(server, path, files, {**model, **(data or {})}, headers)
        assert reply.status_code == status, reply.text
        assert reply.json()["error"]["param"] == param, reply.text
        return reply.json()["error"]["message"]

    assert "segments" in refused(400, "timestamp_granularities[]", data={"timestamp_granularities[]": "word"})
    refused(400, "response_format", data={"response_format": "docx"})
    refused(400, "stream", data={"response_format": "srt", "stream": "true"})
    refused(400, "temperature", data={"temperature": "warm"})
    refused(400, "language", path="/v1/audio/translations", data={"language": "de"})
    refused(400, "file", files={"file": ("bad.wav", b"RIFF....WAVEfmt nonsense", "audio/wav")})
    refused(400, "file", files={"file": (None, "talk.flac")})  # a field naming a file, not an upload
    refused(400, "other", data={"other": "1"})
    refused(404, "model", data={"model": "/etc/passwd"})
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros((MAX_AUDIO_SECONDS + 1) * RATE, dtype=np.int16), RATE, subtype="PCM_16")
    assert "--max-audio-seconds" in refused(413, "file", files={"file": ("long.wav", long.read_bytes(), "audio/wav")})
    too_big = httpx.post(f"{server}/v1/audio/transcriptions", content=b"x" * (9 << 20),
                         headers={"content-type": "multipart/form-data; boundary=x"}, timeout=600)
    assert too_big.status_code == 413
    as_json = httpx.post(f"{server}/v1/audio/transcriptions", json=model, timeout=600)
    assert as_json.status_code == 415
    as_form = upload(server, "/v1/chat/completions", good, model)  # multipart only on the upload paths
    assert as_form.status_code == 415
    foreign = upload(server, "/v1/audio/transcriptions", good, model, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403  # a cross-site form post carries its Origin
    with pytest.raises(BadRequestError, match="word timestamps"):
        with talk.open("rb") as file:
            client.audio.transcriptions.create(model=checkpoint.name, file=file, response_format="verbose_json",
                                               timestamp_granularities=["word"])
    assert httpx.get(f"{server}/health", timeout=60).status_code == 200


def test_an_upload_whose_sound_runs_past_its_header_stops_decoding_at_the_limit(tmp_path):
    """The header check comes first; decoding stops too, in case a file's header says less than it holds."""
    path = tmp_path / "five.wav"
    soundfile.write(path, np.zeros(5 * RATE, dtype=np.float32), RATE)
    with path.open("rb") as file:
        blocks = upload_blocks(SimpleNamespace(upload=SimpleNamespace(file=file)), RATE, limit=2)
        with pytest.raises(SoundTooLong) as refused:
            list(blocks)
        assert file.closed
    error = upload_error(refused.value)
    assert (error.status, error.param) == (413, "file")
    assert error.message == "the recording runs past 2 s, this server's --max-audio-seconds"
