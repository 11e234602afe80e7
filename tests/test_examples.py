"""Each script in examples/ runs on the tiny checkpoint and prints what the API gives for it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma3n import generate, load
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import ChatSession

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_256):
    return load(tiny_ckpt_256.path)


@pytest.fixture(scope="module")
def media(tiny_media):
    return tiny_media["image"], tiny_media["audio"]


def run_example(name: str, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], input=stdin, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def user_turn(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_chat_loop(tiny_ckpt_256, loaded):
    model, processor = loaded
    chat = ChatSession(model, processor)
    params = SamplingParams(temperature=0.0)
    expected = "".join(
        "".join(r.text for r in chat.ask(turn, params, max_tokens=8)) + "\n" for turn in ("hello there", "and you?")
    )
    args = ("--model", str(tiny_ckpt_256.path), "--max-tokens", "8", "--temp", "0")
    assert run_example("chat.py", *args, stdin="hello there\nand you?\n\n") == expected


def test_image_question(tiny_ckpt_256, loaded, media):
    image, _ = media
    expected = generate(*loaded, user_turn({"type": "image", "image": str(image)}, {"type": "text", "text": "what?"}),
                        max_tokens=8, temperature=0.0)
    out = run_example("image_qa.py", "--model", str(tiny_ckpt_256.path), "--image", str(image), "--question", "what?",
                      "--max-tokens", "8")
    assert out == expected + "\n"


def test_transcription(tiny_ckpt_256, loaded, media):
    _, audio = media
    instruction = "Transcribe this audio clip into text."
    expected = generate(*loaded, user_turn({"type": "audio", "audio": str(audio)}, {"type": "text", "text": instruction}),
                        max_tokens=8, temperature=0.0)
    out = run_example("transcribe.py", "--model", str(tiny_ckpt_256.path), "--audio", str(audio), "--max-tokens", "8")
    assert out == expected + "\n"


def test_subtitles_of_a_long_recording(tiny_ckpt_256, tmp_path):
    """The example's SubRip file is the transcribe command's (tests/test_transcribe.py checks that one)."""
    import soundfile

    from helpers import RATE, recording

    audio = tmp_path / "meeting.wav"
    soundfile.write(audio, recording(50, 2)[0], RATE)
    out = run_example("transcribe_srt.py", "--model", str(tiny_ckpt_256.path), str(audio))
    assert out == f"{tmp_path / 'meeting.srt'}\n"
    command = subprocess.run([sys.executable, "-m", "mlx_gemma3n.transcribe", str(audio), "--model", str(tiny_ckpt_256.path),
                              "--format", "srt", "--output-dir", str(tmp_path / "cli"), "--quiet"], capture_output=True, timeout=600)
    assert command.returncode == 0, command.stderr
    assert (tmp_path / "meeting.srt").read_text() == (tmp_path / "cli" / "meeting.srt").read_text()
    assert (tmp_path / "meeting.srt").read_text().count(" --> ") >= 2  # over 50 s: several clips


def test_image_and_audio(tiny_ckpt_256, loaded, media):
    image, audio = media
    instruction = "Answer the question in the audio about the image."
    expected = generate(*loaded, user_turn(
        {"type": "image", "image": str(image)}, {"type": "audio", "audio": str(audio)}, {"type": "text", "text": instruction},
    ), max_tokens=8, temperature=0.0)
    out = run_example("image_and_audio.py", "--model", str(tiny_ckpt_256.path), "--image", str(image), "--audio", str(audio),
                      "--max-tokens", "8")
    assert out == expected + "\n"


def test_bad_model_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "image_qa.py"), "--model", str(tmp_path / "nothing"), "--image", "x.png"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"error: model path {tmp_path / 'nothing'} does not exist"]


def test_tool_agent_loop(tiny_ckpt_256, loaded):
    """One round of calls (the first reply must call), run by the script, then the answer from their
    results: the calls are the API's, each result is what the script's function gives (or its
    error), and the answer is the API's for that history. The date the model is told is fixed: on random
    weights, some dates' prompts make the first call's string argument run past 200 tokens."""
    spec = importlib.util.spec_from_file_location("tools_example", EXAMPLES / "tools.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tools = list(example.FUNCTIONS.values())
    question, today = "Time in Tokyo?", "2026-12-06"
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "tools.py"), "--model", str(tiny_ckpt_256.path), "--question", question,
         "--require-call", "--max-steps", "1", "--max-tokens", "200", "--temp", "0", "--today", today],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    messages = [{"role": "system", "content": f"Today is {today}."}, {"role": "user", "content": question}]
    first = generate(*loaded, messages, max_tokens=200, temperature=0.0, tools=tools, tool_choice="required")
    assert first.tool_calls
    messages.append({"role": "assistant", "content": None, "tool_calls": first.tool_calls})
    shown = []
    for call in first.tool_calls:
        result = example.run_call(call)
        shown.append(f"-> {call['function']['name']}({call['function']['arguments']}) = {result}")
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    assert [line for line in out.stderr.splitlines() if line.startswith("-> ")] == shown
    final = generate(*loaded, messages, max_tokens=200, temperature=0.0, tools=tools, tool_choice="none")
    assert out.stdout == final.content + "\n"
