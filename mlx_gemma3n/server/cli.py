"""`python -m mlx_gemma3n.server --model M [--adapters NAME=PATH ...]`: serve the OpenAI API on
127.0.0.1 (the model and adapters are loaded here, at start; a request can never load anything)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..command import command_parser
from ..errors import Gemma3nError, run_command
from .media import MediaLimits


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("mlx_gemma3n.server", description=__doc__)
    parser.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    parser.add_argument("--model-id", help="the id clients name in 'model' (default: the hub id or the folder's name)")
    parser.add_argument("--adapters", nargs="*", default=[], metavar="NAME=PATH", help="PEFT LoRA adapters, each served as NAME")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--matformer", metavar="SPEC", help="serve a MatFormer slice of an E4B model: a name from "
                        "`python -m mlx_gemma3n.matformer --list` or a JSON file")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--allow-origin", action="append", default=[], help="allow browser requests from this origin (CORS)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="another name clients may reach the server by (its Host header); by default only the bound "
                             "address, 127.0.0.1, localhost and [::1] (a page elsewhere that rebinds its name gets 421)")
    parser.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    parser.add_argument("--max-request-bytes", type=int, default=32 << 20)
    parser.add_argument("--max-images", type=int, default=8, help="images per request")
    parser.add_argument("--max-audio-seconds", type=float, default=600.0, help="seconds of audio per request (a clip over 30 s is cut into several)")
    parser.add_argument("--allow-remote-media", action="store_true", help="let requests name http(s) image URLs (public addresses only)")
    parser.add_argument("--allow-private-media", action="store_true",
                        help="with --allow-remote-media: also fetch from loopback, private and link-local addresses")
    parser.add_argument("--max-image-pixels", type=int, default=50_000_000, help="refuse larger images before decoding them")
    parser.add_argument("--video-fps", type=float, default=1.0, help="frames sampled per second of a video, at most")
    parser.add_argument("--max-video-frames", type=int, default=8, help="frames sampled per video, at most (each counts "
                        "against --max-images)")
    parser.add_argument("--max-tokens", type=int, default=512, help="max_tokens of a request that gives none")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting to join the batch (429 beyond)")
    parser.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    parser.add_argument("--prefix-cache-bytes", type=int, default=1 << 30, help="bytes of prompt caches kept for reuse")
    return parser.parse_args(argv)


def adapter_pairs(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or ":" in name:
            raise Gemma3nError(f"--adapters takes NAME=PATH (NAME without ':'), got '{spec}'")
        pairs.append((name, path))
    return pairs


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ..adapters import ModelWithAdapters
    from ..decoding.grammar import Grammars
    from ..inputs.processor import Processor
    from ..weights.files import resolve_model_path
    from ..weights.loader import load_model
    from .app import Security, create_app
    from .engine import Engine
    from .requests import RequestContext

    adapters = adapter_pairs(args.adapters)
    model_dir = resolve_model_path(args.model)
    processor = Processor(model_dir)

    def load_in_engine():
        model = load_model(model_dir, dtype=args.dtype, matformer=args.matformer, batched=args.max_batch > 1,
                           model_class=ModelWithAdapters)
        for name, path in adapters:
            model.load_adapter(path, name)
        if adapters:
            model.set_adapter(None)
        return model

    engine = Engine(load_in_engine, processor, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_step=args.prefill_step, prefix_cache_bytes=args.prefix_cache_bytes)
    config = engine.start().config
    try:
        engine.grammars = Grammars(processor, config.text.vocab_size, set(processor.eos_token_ids) | set(config.eos_token_ids))
    except ValueError as exc:  # llguidance missing (a Gemma3nError), or a tokenizer it cannot read
        print(f"[mlx_gemma3n.server] tools and response_format json_object/json_schema are off: {exc}", file=sys.stderr)
    model_id = args.model_id or (Path(args.model).name if Path(args.model).exists() else args.model)
    context = RequestContext(
        processor=processor,
        model_id=model_id,
        adapters=tuple(name for name, _ in adapters),
        limits=MediaLimits(args.max_images, args.max_audio_seconds, args.allow_remote_media,
                           allow_private=args.allow_private_media, max_image_pixels=args.max_image_pixels,
                           video_fps=args.video_fps, max_video_frames=args.max_video_frames),
        context_limit=config.text.max_position_embeddings,
        default_max_tokens=args.max_tokens,
        grammars=engine.grammars,
    )
    security = Security(args.api_key, tuple(args.allow_origin), args.max_request_bytes, args.host, args.port, tuple(args.allowed_host))
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    print(f"serving {model_id} on {url}" + ("" if args.no_ui else f" (the chat page: {url}/)"), file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, context, security, page=not args.no_ui), host=args.host, port=args.port, log_level="warning")


def main(argv=None) -> int:
    return run_command(lambda: serve(parse_args(argv)))

