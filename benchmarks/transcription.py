"""Transcription on `small-mm` (bf16): speed as a real-time factor, peak memory by recording length,
where one clip's time goes, ours (`mlx_gemma3n.transcribe`) beside mlx-vlm; and ours' encoder passes
one clip at a time against padded together.

    python -m benchmarks.transcription [--quick] [--parts speed,memory,clip,encoder] [--runs 3] [--seconds 120]
                                       [--tokens 80] [--minutes 1 10 60] [--memory-tokens 4] [--model DIR]

The recordings are generated (`speech_like`: voiced, pitch-wavering bursts of 1.5-9 s, each followed
by a 0.3-1.2 s pause of faint noise; seed 0) and written once as 16 kHz FLAC files, block by block,
into benchmarks/cache/media/. Every measurement is a fresh process (runtimes interleaved, median
(min-max) of --runs), CPU unless --device gpu, after an untimed warm-up on a 2 s clip (`max_batch` of
them at once for ours, so each batch size's decode trace is compiled before the timing).

- speed: the --seconds recording. Ours: `open_transcriber(model, Task(max_tokens=--tokens),
  batch_size=4 | 1)` and `transcriber.transcribe(path)` (file read in blocks, cut into <= 30 s clips,
  each clip one request to the batching engine). mlx-vlm: the same clips (ours' ClipSplitter on the
  same blocks), each its own `stream_generate` request (it takes at most 30 s), one at a time, with the
  same instruction (`mlx_gemma3n.transcribe.prompts.instruction()`) after the audio. Equal work: the
  end-of-sequence ids are cleared for every runtime (ours: the engine's `eos_ids`, read when a request
  starts; mlx-vlm: its tokenizer's stopping criteria), so every clip decodes --tokens tokens; the
  tokens generated per clip are counted and reported. Real-time factor = audio seconds / wall seconds
  of the whole transcription (reading, cutting, preprocessing included); CPU s (user + system, all
  threads) is printed beside it, as it is less swayed by other jobs on a shared machine.
- memory: ours, batch 4, --memory-tokens per clip, on recordings of --minutes, one process each: MLX
  peak during the transcription (reset after the warm-up) and including load, and the process's max
  RSS (VmHWM: ru_maxrss would carry the parent's peak across fork + exec).
- clip: the recording's first clip (<= 30 s). Ours, single-stream layout: preprocessing
  (`processor.prepare`: mel features, chat template), the audio encoder with the soft tokens merged
  (`model.embed_with_media`: tower + embedder + merge), the prefill of the prompt with those
  embeddings (`Session.prefill`, 512-token chunks), then the decode of the --tokens - 1 tokens after
  the first (greedy, one `mx.eval` per token). mlx-vlm: preprocessing (`prepare_inputs`), the encoder
  (`get_audio_features`, as runners/mlxvlm.py times it), time to first token and decode from one
  `stream_generate`; its prefill is time to first token - preprocessing - encoder (it runs both again).
- encoder: ours, the audio tower on the recording's first 4 clips, one pass each (as the engine runs
  them) against one pass of the 4 padded to the longest and masked; interleaved in one process, --runs
  rounds after an untimed one; whether each clip's encodings in the padded pass equal its own pass's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .checkpoints import CACHE, ensure_checkpoint
from .report import summary
from .run import log, machine, versions
from .runners.measure import max_rss_bytes
from .runtimes import REPO, environment

RATE = 16000
WARM_UP_SECONDS = 2.0
RUNTIMES = ("ours", "mlx-vlm")
SPEED_RUNS = (("ours", 4), ("ours", 1), ("mlx-vlm", 1))  # (runtime, batch size)
ENCODER_BATCH = 4


def speech_like(seconds: float, seed: int = 0):
    """Pieces (a burst, then its pause) of a speech-like recording of `seconds` at 16 kHz, float32."""
    rng = np.random.default_rng(seed)
    left = int(seconds * RATE)
    while left > 0:
        t = np.arange(int(rng.uniform(1.5, 9.0) * RATE)) / RATE
        pitch = rng.uniform(90, 220) * (1 + 0.06 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
        phase = 2 * np.pi * np.cumsum(pitch) / RATE
        syllables = 0.3 + 0.7 * np.sin(np.pi * rng.uniform(3, 5) * t) ** 2
        burst = rng.uniform(0.2, 0.5) * syllables * sum(np.sin(k * phase) / k for k in range(1, 5))
        piece = np.concatenate([burst, np.zeros(int(rng.uniform(0.3, 1.2) * RATE))])
        piece += 0.003 * rng.standard_normal(len(piece))
        yield piece[:left].astype(np.float32)
        left -= len(piece)


def recording(seconds: float) -> Path:
    """The cached FLAC of `speech_like(seconds)`, written piece by piece (never whole in memory)."""
    import soundfile

    path = CACHE / "media" / f"speech-{seconds:g}s-16k.flac"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with soundfile.SoundFile(partial, "w", RATE, 1, format="FLAC", subtype="PCM_16") as out:
            for piece in speech_like(seconds):
                out.write(piece)
        partial.rename(path)
    return path


def warm_up_clip() -> np.ndarray:
    return np.concatenate(list(speech_like(WARM_UP_SECONDS, seed=1)))


def clips(path: str, max_samples: int):
    """(start, end, samples) of the clips ours cuts `path` into, read in blocks."""
    from mlx_gemma3n.inputs.audio_files import read_audio_blocks
    from mlx_gemma3n.inputs.audio_split import ClipSplitter

    splitter = ClipSplitter(RATE, max_samples)
    for block in read_audio_blocks(path, path, RATE):
        yield from splitter.push(block)
    yield from splitter.finish()


def audio_seconds(path: str) -> float:
    import soundfile

    return soundfile.info(path).frames / RATE


def cpu_seconds() -> float:
    """User + system CPU time of this process's threads so far: less swayed by other jobs than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def with_memory(result: dict, load_peak: float) -> dict:
    import mlx.core as mx

    peak = mx.get_peak_memory() / 1e9
    return dict(result, mlx_peak_gb=peak, mlx_peak_with_load_gb=max(peak, load_peak), max_rss_gb=max_rss_bytes() / 1e9)


# --- workers: each runs in its own process (`--worker JSON`) and returns its result ---


def counted_tokens(engine) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens) of each request the engine finishes, in order of finishing."""
    done, submit = [], engine.submit

    def counted(job):
        deliver = job.deliver

        def recorded(delta):
            if delta.usage is not None:
                done.append((delta.usage.prompt_tokens, delta.usage.completion_tokens))
            deliver(delta)

        job.deliver = recorded
        submit(job)

    engine.submit = counted
    return done


def ours_transcribe(job: dict) -> dict:
    import mlx.core as mx

    from mlx_gemma3n.transcribe import Task, open_transcriber

    with open_transcriber(job["model"], Task(max_tokens=job["tokens"]), batch_size=job["batch"]) as transcriber:
        transcriber.engine.eos_ids = set()  # random weights: no clip may end before max_tokens
        tokens = counted_tokens(transcriber.engine)
        load_peak = mx.get_peak_memory() / 1e9
        samples, stop = warm_up_clip(), threading.Event()
        for clip in [transcriber.submit(0, len(samples), samples) for _ in range(job["batch"])]:
            transcriber.finished(clip, stop)
        tokens.clear()
        mx.reset_peak_memory()
        start, cpu = time.perf_counter(), cpu_seconds()
        segments = list(transcriber.transcribe(job["audio"]))
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return with_memory(dict(wall_s=wall, cpu_s=cpu, rtf=audio_seconds(job["audio"]) / wall, segments=len(segments),
                       prompt_tokens=sorted({p for p, _ in tokens}), tokens=[n for _, n in tokens]), load_peak)


def mlxvlm_model(folder: str):
    """mlx-vlm's model and processor (end-of-sequence ids cleared, runners/mlxvlm.py) and its prompt."""
    from mlx_vlm.prompt_utils import apply_chat_template

    from mlx_gemma3n.transcribe.prompts import instruction

    from .runners.mlxvlm import load

    model, processor, _ = load(folder)
    return model, processor, apply_chat_template(processor, model.config, instruction(), num_audios=1)


def mlxvlm_stream(model, processor, prompt, samples, tokens: int):
    """(time, response) per generated token of one clip's request."""
    from mlx_vlm import stream_generate

    responses = stream_generate(model, processor, prompt, audio=[samples], max_tokens=tokens, temperature=0.0)
    return [(time.perf_counter(), r) for r in itertools.islice(responses, tokens)]  # not its closing summary


def mlxvlm_transcribe(job: dict) -> dict:
    import mlx.core as mx

    from mlx_gemma3n.inputs.audio_split import is_silent
    from mlx_gemma3n.inputs.processor import Processor

    max_samples = Processor(Path(job["model"])).max_clip_samples
    model, processor, prompt = mlxvlm_model(job["model"])
    load_peak = mx.get_peak_memory() / 1e9
    mlxvlm_stream(model, processor, prompt, warm_up_clip(), job["tokens"])
    mx.reset_peak_memory()
    start, cpu = time.perf_counter(), cpu_seconds()
    runs = [mlxvlm_stream(model, processor, prompt, samples, job["tokens"])
            for _, _, samples in clips(job["audio"], max_samples) if not is_silent(samples)]
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return with_memory(dict(wall_s=wall, cpu_s=cpu, rtf=audio_seconds(job["audio"]) / wall, prompt_tokens=sorted({r[0][1].prompt_tokens for r in runs}),
                       tokens=[len(r) for r in runs]), load_peak)


def first_clip(job: dict, max_samples: int) -> np.ndarray:
    return next(clips(job["audio"], max_samples))[2]


def ours_clip(job: dict) -> dict:
    import mlx.core as mx

    from mlx_gemma3n import load
    from mlx_gemma3n.generate import Session
    from mlx_gemma3n.transcribe.prompts import instruction

    model, processor = load(job["model"])
    samples = first_clip(job, processor.max_clip_samples)

    def one_pass(samples) -> dict:
        marks = [time.perf_counter()]
        prompt = processor.prepare([{"role": "user", "content": [{"type": "audio", "audio": samples},
                                                                 {"type": "text", "text": instruction()}]}])
        marks.append(time.perf_counter())
        embeddings = model.embed_with_media(mx.array([prompt.ids]), prompt.images, prompt.audio)
        mx.eval(embeddings)
        marks.append(time.perf_counter())
        session = Session(model, processor)
        token = mx.argmax(session.prefill(prompt.ids, 512, embeddings), axis=-1, keepdims=True)
        mx.eval(token)
        marks.append(time.perf_counter())
        for _ in range(job["tokens"] - 1):
            token = mx.argmax(model(token, cache=session.cache)[:, -1], axis=-1, keepdims=True)
            mx.eval(token)
        marks.append(time.perf_counter())
        steps = dict(zip(("preprocess_s", "encode_s", "prefill_s", "decode_s"), np.diff(marks).tolist()))
        return dict(steps, ttft_s=marks[3] - marks[0], total_s=marks[4] - marks[0], decode_tps=(job["tokens"] - 1) / steps["decode_s"],
                    prompt_tokens=len(prompt.ids), tokens=job["tokens"])

    one_pass(warm_up_clip())
    return dict(one_pass(samples), clip_s=len(samples) / RATE)


def mlxvlm_clip(job: dict) -> dict:
    import mlx.core as mx
    from mlx_vlm.utils import prepare_inputs

    from mlx_gemma3n.inputs.processor import Processor

    samples = first_clip(job, Processor(Path(job["model"])).max_clip_samples)
    model, processor, prompt = mlxvlm_model(job["model"])

    def one_pass(samples) -> dict:
        start = time.perf_counter()
        inputs = prepare_inputs(processor, prompts=prompt, image_token_index=model.config.image_token_index, audio=[samples])
        prepared = time.perf_counter()
        mx.eval(model.get_audio_features(inputs["input_features"], ~inputs["input_features_mask"])[0])
        encoded = time.perf_counter()
        stream = mlxvlm_stream(model, processor, prompt, samples, job["tokens"])  # preprocesses and encodes again
        ttft = stream[0][0] - encoded
        steps = dict(preprocess_s=prepared - start, encode_s=encoded - prepared, prefill_s=ttft - (encoded - start))
        decode = stream[-1][0] - stream[0][0]
        return dict(steps, ttft_s=ttft, decode_s=decode, decode_tps=(len(stream) - 1) / decode, total_s=stream[-1][0] - encoded,
                    prompt_tokens=stream[0][1].prompt_tokens, tokens=len(stream))

    one_pass(warm_up_clip())
    return dict(one_pass(samples), clip_s=len(samples) / RATE)


def ours_encoder(job: dict) -> dict:
    import mlx.core as mx

    from mlx_gemma3n import load

    model, processor = load(job["model"])
    tower = model.tower("audio_tower")
    found = list(itertools.islice(clips(job["audio"], processor.max_clip_samples), ENCODER_BATCH))
    features = [processor.audio_features(samples) for _, _, samples in found]
    longest = max(len(mask) for _, mask in features)
    padded = np.zeros((len(features), longest, features[0][0].shape[1]), np.float32)
    padded_mask = np.zeros((len(features), longest), bool)
    for row, (feature, mask) in enumerate(features):
        padded[row, : len(mask)], padded_mask[row, : len(mask)] = feature, mask

    def one_at_a_time() -> list[mx.array]:
        encoded = [tower(mx.array(feature)[None], mx.array(mask)[None])[0][0] for feature, mask in features]
        mx.eval(encoded)
        return encoded

    def padded_pass() -> mx.array:
        encoded = tower(mx.array(padded), mx.array(padded_mask))[0]
        mx.eval(encoded)
        return encoded

    alone, batched = one_at_a_time(), padded_pass()
    equal = all(mx.array_equal(a, batched[row, : a.shape[0]]).item() for row, a in enumerate(alone))
    times = {"alone_s": [], "padded_s": []}
    for _ in range(job["runs"]):
        for key, run in (("alone_s", one_at_a_time), ("padded_s", padded_pass)):
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return dict(times, clips_s=[samples.size / RATE for _, _, samples in found], equal=equal)


WORKERS = {"ours-transcribe": ours_transcribe, "mlx-vlm-transcribe": mlxvlm_transcribe,
           "ours-clip": ours_clip, "mlx-vlm-clip": mlxvlm_clip, "ours-encoder": ours_encoder}


def worker(job: dict) -> None:
    import mlx.core as mx

    mx.set_default_device(getattr(mx, job["device"]))
    print("RESULT " + json.dumps(WORKERS[job["worker"]](job)), flush=True)


def fresh(**job) -> dict:
    """One worker run in a fresh process: its result, or {"error": its last line of stderr}."""
    log(f"{job['worker']} {', '.join(f'{k}={v}' for k, v in job.items() if k not in ('worker', 'model'))}")
    done = subprocess.run([sys.executable, "-m", "benchmarks.transcription", "--worker", json.dumps(job)],
                          env=environment(), cwd=REPO, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            log(f"  {line[7:]}")
            return json.loads(line[7:])
    error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    log(f"  failed: {error}")
    return {"error": error}


# --- tables ---


def cell(runs: list[dict], key: str) -> str:
    found = summary([run.get(key) for run in runs if "error" not in run])
    return found[1] if found else "-"


def median(runs: list[dict], key: str) -> float | None:
    found = summary([run.get(key) for run in runs if "error" not in run])
    return found[0] if found else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def counts(runs: list[dict], key: str) -> str:
    values = sorted({v for run in runs if "error" not in run for v in (run[key] if isinstance(run[key], list) else [run[key]])})
    return "/".join(map(str, values)) or "-"


def errors(results: dict[str, list[dict]]) -> list[str]:
    return [f"\n{name} failed: `{run['error']}`" for name, runs in results.items() for run in runs if "error" in run]


def speed_table(results: dict[str, list[dict]]) -> list[str]:
    lines = ["| runtime | real-time factor ↑ | wall s | CPU s | clips | tokens per clip | prompt tokens | MLX peak GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        ok = [run for run in runs if "error" not in run]
        clip_count = counts([{"n": len(run["tokens"])} for run in ok], "n")
        lines.append(f"| {name} | {cell(runs, 'rtf')} | {cell(runs, 'wall_s')} | {cell(runs, 'cpu_s')} | {clip_count} | {counts(ok, 'tokens')} | "
                     f"{counts(ok, 'prompt_tokens')} | {cell(runs, 'mlx_peak_gb')} |")
    rtf = {name: median(runs, "rtf") for name, runs in results.items()}
    batched, single, peer = (rtf.get(name) for name in ("ours, batch 4", "ours, batch 1", "mlx-vlm"))
    lines += ["", (f"Ratios of the real-time factors: ours batched / ours one clip at a time {ratio(batched, single)}, "
                   f"ours batched / mlx-vlm {ratio(batched, peer)}, ours one at a time / mlx-vlm {ratio(single, peer)}.")]
    return lines + errors(results)


def memory_table(results: dict[str, list[dict]]) -> list[str]:
    lines = ["| audio | clips | wall s | real-time factor | MLX peak GB (transcription) | MLX peak GB (incl. load) | max RSS GB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        clip_count = counts([{"n": len(run["tokens"])} for run in runs if "error" not in run], "n")
        lines.append(f"| {name} | {clip_count} | {cell(runs, 'wall_s')} | {cell(runs, 'rtf')} | {cell(runs, 'mlx_peak_gb')} | "
                     f"{cell(runs, 'mlx_peak_with_load_gb')} | {cell(runs, 'max_rss_gb')} |")
    return lines + errors(results)


CLIP_ROWS = [("preprocess_s", "preprocessing s"), ("encode_s", "audio encoder s"), ("prefill_s", "prefill s (mlx-vlm: derived)"),
             ("ttft_s", "time to first token s"), ("decode_s", "decode s (tokens after the first)"), ("decode_tps", "decode tok/s"),
             ("total_s", "clip total s")]


def clip_table(results: dict[str, list[dict]]) -> list[str]:
    ours, peer = results.get("ours", []), results.get("mlx-vlm", [])
    lines = ["| step | ours | mlx-vlm | ours/mlx-vlm |", "| --- | --- | --- | --- |"]
    for key, label in CLIP_ROWS:
        lines.append(f"| {label} | {cell(ours, key)} | {cell(peer, key)} | {ratio(median(ours, key), median(peer, key))} |")
    lines += ["", (f"Clip: {cell(ours, 'clip_s')} s; prompt tokens: ours {counts(ours, 'prompt_tokens')}, mlx-vlm "
                   f"{counts(peer, 'prompt_tokens')}; tokens generated: ours {counts(ours, 'tokens')}, mlx-vlm {counts(peer, 'tokens')}.")]
    return lines + errors(results)


def encoder_table(result: dict) -> list[str]:
    if "error" in result:
        return errors({"encoder": [result]})
    alone, padded = (summary(result[key]) for key in ("alone_s", "padded_s"))
    audio, padded_audio = sum(result["clips_s"]), len(result["clips_s"]) * max(result["clips_s"])
    return ["| clips | audio s | padded audio s | one pass each s | one padded pass s | padded / each | encodings equal |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {' + '.join(f'{seconds:.1f}' for seconds in result['clips_s'])} | {audio:.1f} | {padded_audio:.1f} | {alone[1]} | {padded[1]} | "
            f"{ratio(padded[0], alone[0])} | {result['equal']} |"]


# --- the parts ---


def speed(args, common: dict) -> list[str]:
    audio = str(recording(args.seconds))
    plan = [(runtime, batch) for runtime, batch in SPEED_RUNS if runtime in args.only]
    results = {f"{runtime}, batch {batch}" if runtime == "ours" else runtime: [] for runtime, batch in plan}
    for _ in range(args.runs):
        for (runtime, batch), runs in zip(plan, results.values()):
            runs.append(fresh(worker=f"{runtime}-transcribe", audio=audio, batch=batch, tokens=args.tokens, **common))
    return f"Speed: a {args.seconds:g} s recording, {args.tokens} tokens per clip", speed_table(results), results


def memory_part(args, common: dict) -> list[str]:
    results = {f"{minutes:g} min": [fresh(worker="ours-transcribe", audio=str(recording(60 * minutes)), batch=4,
                                          tokens=args.memory_tokens, **common)] for minutes in args.minutes}
    return f"Memory by recording length: ours, batch 4, {args.memory_tokens} tokens per clip", memory_table(results), results


def clip(args, common: dict) -> list[str]:
    audio = str(recording(args.seconds))
    results = {runtime: [] for runtime in RUNTIMES if runtime in args.only}
    for _ in range(args.runs):
        for runtime, runs in results.items():
            runs.append(fresh(worker=f"{runtime}-clip", audio=audio, tokens=args.tokens, **common))
    return f"Where one clip's time goes: the recording's first clip, {args.tokens} tokens", clip_table(results), results


def encoder(args, common: dict) -> list[str]:
    result = fresh(worker="ours-encoder", audio=str(recording(args.seconds)), runs=args.runs, **common)
    return f"Encoder passes: {ENCODER_BATCH} clips one at a time or padded into one", encoder_table(result), result


PARTS = {"speed": speed, "memory": memory_part, "clip": clip, "encoder": encoder}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transcription", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of speed,memory,clip,encoder")
    parser.add_argument("--quick", action="store_true", help="1 run, a 60 s recording, memory at 1 and 2 minutes")
    parser.add_argument("--runs", type=int, default=3, help="runs per runtime (speed, clip), interleaved; rounds (encoder)")
    parser.add_argument("--seconds", type=float, default=120, help="the speed recording's length")
    parser.add_argument("--tokens", type=int, default=80,
                        help="tokens per clip (speed, clip); 80: about what 25 s of speech at 150 words a minute gives")
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60], help="recording lengths (memory)")
    parser.add_argument("--memory-tokens", type=int, default=4, help="tokens per clip (memory)")
    parser.add_argument("--only", default=",".join(RUNTIMES), help="comma-separated subset of ours,mlx-vlm")
    parser.add_argument("--model", help="model folder (default: the `small-mm` checkpoint, built once)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--json", type=Path, help="also write every run's result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.runs, args.seconds, args.minutes = 1, 60, [1, 2]
    parts, args.only = args.parts.split(","), args.only.split(",")
    if set(parts) - set(PARTS) or set(args.only) - set(RUNTIMES):
        parser.error(f"--parts takes a subset of {','.join(PARTS)}, --only of {','.join(RUNTIMES)}")
    common = dict(model=str(args.model or ensure_checkpoint("small-mm")), device=args.device)
    command = "python -m benchmarks.transcription " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = [f"Command: `{command}`  ", f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  ",
              f"Machine: {machine(args.device)}  ", f"Versions: {versions()}  ", f"Model: {common['model']} (bf16)", ""]
    print("\n".join(header), flush=True)
    raw = {"header": header}
    for part in parts:
        start = time.perf_counter()
        title, lines, raw[part] = PARTS[part](args, common)
        print("\n".join([f"### {title} ({time.perf_counter() - start:.0f} s)", "", *lines, ""]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))

if __name__ == "__main__":
    main()
