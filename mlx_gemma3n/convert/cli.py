"""`python -m mlx_gemma3n.convert`: Hugging Face Gemma 3n checkpoint -> MLX folder."""

from __future__ import annotations

import sys

from mlx_gemma3n.command import command_parser
from mlx_gemma3n.errors import Gemma3nError, run_command
from mlx_gemma3n.weights.quantization import MODES, RECIPES

from .convert import convert
from .progress import QUIET_HELP


def upload(folder, repo_id: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as exc:  # network, auth and permission failures all end the same way
        raise Gemma3nError(f"upload to '{repo_id}' failed ({type(exc).__name__}: {exc}); the folder is at {folder}") from None


def main(argv=None) -> int:
    parser = command_parser("mlx_gemma3n.convert", description=__doc__)
    parser.add_argument("--hf-path", required=True, help="source: local folder or Hugging Face hub id")
    parser.add_argument("--mlx-path", required=True, help="destination folder")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32 (float parts)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize Linear and Embedding weights")
    parser.add_argument("--q-bits", type=int, help="affine mode: 2, 3, 4, 5, 6 or 8 (default 4)")
    parser.add_argument("--q-group-size", type=int, help="affine mode: 32, 64 or 128 (default 64)")
    parser.add_argument("--q-mode", default="affine", help=f"one of {', '.join(MODES)} (default affine; the float "
                        "modes have their own bits and group size: mxfp4 4/32, mxfp8 8/32, nvfp4 4/16)")
    parser.add_argument("--quant-recipe", help=f"one of {', '.join(RECIPES)} (default: uniform<q-bits>)")
    parser.add_argument("--quantize-towers", type=int, nargs="?", const=8, metavar="BITS",
                        help="quantize the audio tower's Linears and the vision tower's pointwise convolutions too, "
                        "at BITS (default 8: near-lossless where 4 is not, benchmarks/RESULTS.md; without the "
                        "flag the towers stay float)")
    parser.add_argument("--adapter-path", help="fuse this PEFT LoRA adapter (folder or hub id) into the weights")
    parser.add_argument("--matformer", metavar="SPEC", help="write this MatFormer slice of an E4B checkpoint: a name "
                        "from `python -m mlx_gemma3n.matformer --list` or a JSON file")
    parser.add_argument("--upload-repo", help="upload the result to this hub repo (ORG/NAME)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    args = parser.parse_args(argv)
    return run_command(lambda: convert_and_upload(args))


def convert_and_upload(args) -> None:
    folder = convert(
        args.hf_path, args.mlx_path, dtype=args.dtype, quantize=args.quantize or bool(args.quant_recipe),
        q_bits=args.q_bits, q_group_size=args.q_group_size, q_mode=args.q_mode, q_tower_bits=args.quantize_towers, quant_recipe=args.quant_recipe, force=args.force,
        adapter_path=args.adapter_path, matformer=args.matformer, quiet=args.quiet,
    )
    print(f"[convert] wrote {folder}", file=sys.stderr)
    if args.upload_repo:
        upload(folder, args.upload_repo)
        print(f"[convert] uploaded to https://huggingface.co/{args.upload_repo}", file=sys.stderr)
