"""MLX-side helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import socket
import struct
import subprocess
import sys
import termios
import time

import numpy as np

SERVER_STARTUP_DEADLINE_S = 600  # generous: the machine is shared and busy
RATE = 16000  # Gemma 3n's audio sampling rate


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the parity measure of the whole suite (bar: 1e-4)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def streams_as_reference(streams) -> np.ndarray:
    """Our AltUp streams (B, T, n, H) in the reference layout (n, B, T, H)."""
    return np.asarray(streams).transpose(2, 0, 1, 3)


def prompt_ids(seed: int, length: int, vocab_size: int = 512, batch: int = 1) -> np.ndarray:
    """Random ids over the whole vocabulary: text ids, ids past the PLE table, multimodal hard ids."""
    ids = np.random.default_rng(seed).integers(3, vocab_size, size=(batch, length))
    ids[:, 0] = 2  # <bos>
    return ids


def greedy_ignoring_eos(model, processor, prompt, max_tokens: int, prefill_step_size: int = 100) -> list[int]:
    """Our greedy tokens with the stop tokens switched off (as reference.reference_greedy with
    stop_at_eos=False): exactly `max_tokens` of them."""
    from mlx_gemma3n.decoding.sampling import SamplingParams
    from mlx_gemma3n.generate import Session

    eos, processor.eos_token_ids = processor.eos_token_ids, set()
    config_eos, model.config.eos_token_ids = model.config.eos_token_ids, []
    try:
        responses = Session(model, processor).stream(prompt, SamplingParams(temperature=0.0), max_tokens, prefill_step_size=prefill_step_size)
        return [r.token for r in responses]
    finally:
        processor.eos_token_ids, model.config.eos_token_ids = eos, config_eos


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(arguments: list[str], log_path):
    """`python -m mlx_gemma3n.server ARGUMENTS --port P` on a free 127.0.0.1 port, up and healthy:
    yields its base URL; stopped on exit."""
    import httpx
    import pytest

    port = free_port()
    command = [sys.executable, "-m", "mlx_gemma3n.server", *arguments, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_STARTUP_DEADLINE_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not come up")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def raw_http(server, request: bytes) -> bytes:
    """The status line and headers a server sends back for a raw HTTP request."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # the server may answer and close before taking the whole body
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer


def recording(seconds: float, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Bursts of 1.5-9 s of voiced, pitch-wavering sound, separated by pauses of 0.25-1.2 s of faint
    noise; returns the samples and the pauses as (start, end) sample offsets."""
    rng = np.random.default_rng(seed)
    pieces, pauses, at = [], [], 0
    while at < seconds * RATE:
        length = int(rng.uniform(1.5, 9.0) * RATE)
        t = np.arange(length) / RATE
        pitch = rng.uniform(90, 220)
        phase = 2 * np.pi * pitch * t + rng.uniform(1, 4) * np.sin(2 * np.pi * rng.uniform(2, 6) * t)
        syllables = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2  # loudness rises and falls, never silent
        voiced = sum(np.sin(k * phase) / k for k in range(1, 6)) * syllables * rng.uniform(0.2, 0.6)
        pieces.append(voiced + 0.01 * rng.standard_normal(length))
        at += length
        gap = int(rng.uniform(0.25, 1.2) * RATE)
        pieces.append(0.002 * rng.standard_normal(gap))
        pauses.append((at, at + gap))
        at += gap
    return np.concatenate(pieces).astype(np.float32), pauses


def on_a_terminal(command: list[str]) -> tuple[int, str]:
    """Runs `command` with its stderr on a pseudo-terminal: (exit code, what it wrote there)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns: a real terminal's
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    written = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal's last descriptor
                chunk = b""
            if not chunk:
                break
            written += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(), written.decode(errors="replace")
