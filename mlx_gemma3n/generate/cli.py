"""`python -m mlx_gemma3n.generate`: generate text from the command line, or chat (`--chat`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import mlx.core as mx

from .. import load
from ..architecture.cache import kv_cache_bytes, load_prompt_cache, save_prompt_cache
from ..command import command_parser
from ..decoding.sampling import SamplingParams
from ..errors import Gemma3nError, run_command
from ..inputs.processor import Prompt
from . import ChatSession, Session, prepare_prompt, reply_of, sampling_params, stream_generate

DEFAULT_MODEL = "google/gemma-3n-E2B-it"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("mlx_gemma3n.generate", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hugging Face hub id")
    parser.add_argument("--adapter-path", help="a PEFT LoRA adapter (folder or hub id) to run over the model")
    parser.add_argument("--matformer", metavar="SPEC", help="run a MatFormer slice of an E4B model: a name from "
                        "`python -m mlx_gemma3n.matformer --list` or a JSON file")
    parser.add_argument("--prompt", "-p", help="the prompt; '-' reads it from stdin")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--image", action="append", default=[], help="image file or URL (repeatable)")
    parser.add_argument("--audio", action="append", default=[], help="audio file: WAV, FLAC, MP3... (repeatable)")
    parser.add_argument("--video", action="append", default=[], help="video file: MP4, WebM, MOV...; its frames as images, "
                        "each after its time, then its sound (repeatable; needs the [video] extra)")
    parser.add_argument("--video-fps", type=float, default=1.0, help="video frames sampled per second, at most")
    parser.add_argument("--max-frames", type=int, default=8, help="video frames per video, at most (spread over the whole video)")
    parser.add_argument("--max-tokens", "-m", type=int, default=256)
    parser.add_argument("--temp", type=float, help="sampling temperature (0 = greedy; default: the model's)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="cast the weights")
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill chunk")
    parser.add_argument("--prompt-cache-file", help="reuse the prompt's KV cache from this file / save it there")
    parser.add_argument("--chat", action="store_true", help="interactive chat on stdin, keeping the KV cache")
    parser.add_argument("--tools", metavar="FILE.json", help="OpenAI tools (a JSON list) the model may call; prints the "
                        "reply as JSON: {role, content, tool_calls}")
    parser.add_argument("--tool-choice", default="auto", metavar="auto|none|required|NAME",
                        help="with --tools: let the model choose, never call, call at least once, or call NAME")
    parser.add_argument(
        "--show-special-tokens", action="store_true", help="keep special tokens (<image_soft_token>, ...) in the reply text"
    )
    parser.add_argument("--verbose", action="store_true", help="also report the KV-cache size")
    args = parser.parse_args(argv)
    if not args.chat and args.prompt is None:
        parser.error("--prompt is required (or use --chat)")
    if args.max_tokens <= 0:
        raise Gemma3nError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if args.prefill_step_size <= 0:
        raise Gemma3nError(f"--prefill-step-size must be > 0, got {args.prefill_step_size}")
    if args.prompt_cache_file and (args.image or args.audio or args.video):
        raise Gemma3nError("--prompt-cache-file works with text prompts only, not with --image/--audio/--video")
    if not args.video_fps > 0:
        raise Gemma3nError(f"--video-fps must be > 0, got {args.video_fps}")
    if args.max_frames < 1:
        raise Gemma3nError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.tools and (args.chat or args.prompt_cache_file):
        raise Gemma3nError("--tools works with --prompt, not with --chat or --prompt-cache-file")
    return args


def read_tools_file(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as file:
            tools = json.load(file)
    except OSError as exc:
        raise Gemma3nError(f"--tools: cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Gemma3nError(f"--tools: {path} is not JSON: {exc}") from None
    return tools


def tool_choice_arg(value: str):
    return value if value in ("auto", "none", "required") else {"type": "function", "function": {"name": value}}


def user_content(text: str, args):
    """The user turn: plain text, or content parts when images, audio or videos come with it."""
    if not (args.image or args.audio or args.video):
        return text
    media = [{"type": "image", "image": i} for i in args.image] + [{"type": "audio", "audio": a} for a in args.audio]
    videos = [{"type": "video", "video": v, "fps": args.video_fps, "max_frames": args.max_frames} for v in args.video]
    return media + videos + [{"type": "text", "text": text}]


def print_stats(response, session: Session, verbose: bool) -> None:
    print(file=sys.stderr)
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.2f} tokens-per-sec", file=sys.stderr)
    print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.2f} tokens-per-sec", file=sys.stderr)
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=sys.stderr)
    if verbose:
        held = sum(c.nbytes for c in session.cache)
        planned = kv_cache_bytes(session.model.config.text, len(session.history), session.cache[0].keys.itemsize)
        print(f"KV cache: {held / 1e6:.2f} MB held for {len(session.history)} tokens (plan: {planned / 1e6:.2f} MB)", file=sys.stderr)


def run_turn(responses, session: Session, verbose: bool) -> None:
    response = None
    for response in responses:
        print(response.text, end="", flush=True)
    print(flush=True)
    print_stats(response, session, verbose)


def session_for_prompt(model, processor, prompt: Prompt, args) -> tuple[Session, Prompt]:
    """A session and what is still to feed, reusing --prompt-cache-file when it fits the prompt."""
    path, tokens = args.prompt_cache_file, prompt.ids
    if not path:
        return Session(model, processor), prompt
    if os.path.exists(path):
        cache, cached = load_prompt_cache(path, model.config.text, model.fingerprint())
        if len(cached) < len(tokens) and tokens[: len(cached)] == cached:
            return Session(model, processor, cache, cached), Prompt(tokens[len(cached) :])
        print(f"[mlx_gemma3n] {path} holds another prompt; prefilling from scratch", file=sys.stderr)
    session = Session(model, processor)
    session.prefill(tokens[:-1], args.prefill_step_size)
    save_prompt_cache(path, session.cache, session.history, model.fingerprint())
    return session, Prompt(tokens[-1:])


def chat(model, processor, params, args) -> None:
    conversation = ChatSession(model, processor, system=args.system)
    print("[chat] type a message; an empty line or Ctrl-D ends", file=sys.stderr)
    for turn, line in enumerate(sys.stdin):
        if not line.strip():
            break
        content = user_content(line.strip(), args) if turn == 0 else line.strip()
        skip = not args.show_special_tokens
        responses = conversation.ask(content, params, args.max_tokens, args.prefill_step_size, skip)
        run_turn(responses, conversation.session, args.verbose)


def generate_from_args(args) -> None:
    chosen = {
        "temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    SamplingParams(**{k: v for k, v in chosen.items() if v is not None})  # fail before loading
    tools = read_tools_file(args.tools) if args.tools else None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.chat and not prompt.strip():
        raise Gemma3nError("the prompt is empty")
    model, processor = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path, matformer=args.matformer)
    params = sampling_params(processor, **chosen)
    if args.seed is not None:
        mx.random.seed(args.seed)
    if args.chat:
        chat(model, processor, params, args)
        return
    content = user_content(prompt, args)
    messages = content if isinstance(content, str) else [{"role": "user", "content": content}]
    if tools is not None:
        call_tools(model, processor, messages, tools, chosen, args)
        return
    session, prepared = session_for_prompt(model, processor, prepare_prompt(processor, messages, args.system), args)
    responses = session.stream(prepared, params, args.max_tokens, args.prefill_step_size, not args.show_special_tokens)
    run_turn(responses, session, args.verbose)


def call_tools(model, processor, messages, tools, chosen: dict, args) -> None:
    """The reply under --tools, as the server's message: {role, content, tool_calls}."""
    responses = list(stream_generate(
        model, processor, messages, args.max_tokens, system=args.system, prefill_step_size=args.prefill_step_size,
        tools=tools, tool_choice=tool_choice_arg(args.tool_choice), **chosen,
    ))
    reply = reply_of(responses)
    print(json.dumps({"role": "assistant", "content": reply.content, "tool_calls": reply.tool_calls}, ensure_ascii=False), flush=True)
    print(f"finish_reason: {reply.finish_reason}", file=sys.stderr)
    print_stats(responses[-1], None, False)


def main(argv=None) -> int:
    return run_command(lambda: generate_from_args(parse_args(argv)))
