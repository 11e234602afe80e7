"""`python -m mlx_gemma3n.fuse`: a PEFT LoRA adapter fused into its base model's weights.

The output is an MLX folder in the base's float dtype, quantized like the base when the base is
(fused layers re-quantized with the base's settings), or with `--hf-format` a Transformers
checkpoint (float weights, Google's names) that `Gemma3nForConditionalGeneration.from_pretrained`
loads. Without an adapter, `--hf-format` / `--dequantize` export the base model itself.
"""

from __future__ import annotations

import sys

from .architecture.config import read_config
from .command import command_parser
from .convert import convert
from .convert.progress import QUIET_HELP
from .errors import Gemma3nError, run_command
from .weights.files import resolve_model_path
from .weights.loader import COMPUTE_DTYPES


def float_dtype(raw_config: dict) -> str:
    """The dtype of the base's float weights, as its config.json records it (default bfloat16)."""
    for config in (raw_config, raw_config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if config.get(key) in COMPUTE_DTYPES:
                return config[key]
    return "bfloat16"


def main(argv=None) -> int:
    parser = command_parser("mlx_gemma3n.fuse", description=__doc__)
    parser.add_argument("--model", required=True, help="base model: a Hugging Face or MLX folder, or a hub id")
    parser.add_argument("--adapter-path", help="PEFT LoRA adapter: folder or hub id")
    parser.add_argument("--save-path", required=True, help="destination folder")
    parser.add_argument("--dequantize", action="store_true", help="write float weights for a quantized base")
    parser.add_argument("--hf-format", action="store_true", help="write a Transformers checkpoint (float weights)")
    parser.add_argument("--dtype", choices=list(COMPUTE_DTYPES), help="float dtype of the output (default: the base's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    args = parser.parse_args(argv)
    return run_command(lambda: fuse(args))


def fuse(args) -> None:
    if args.adapter_path is None and not (args.hf_format or args.dequantize):
        raise Gemma3nError("nothing to do: pass --adapter-path, or --hf-format / --dequantize to export the base")
    dtype = args.dtype or float_dtype(read_config(resolve_model_path(args.model)))
    folder = convert(
        args.model, args.save_path, dtype=dtype, force=args.force, adapter_path=args.adapter_path,
        dequantize=args.dequantize, hf_format=args.hf_format, quiet=args.quiet,
    )
    print(f"[fuse] wrote {folder}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
