"""MatFormer mix-n-match: the Gemma 3n sizes nested in E4B, cut from its weights.

`python -m mlx_gemma3n.matformer --list` prints the published slices; weights/matformer.py cuts them
(`--matformer` of generate, convert and the server, `load(..., matformer=)`).
"""

from __future__ import annotations

from .command import command_parser
from .errors import run_command
from .weights.matformer import TABLE_SOURCE, table


def run_lengths(values: tuple[int, ...]) -> str:
    """8192 x4, 16384, 8192 x15: a row's widths, compactly."""
    runs = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{v} x{count}" if count > 1 else str(v) for v, count in runs)


def table_text() -> str:
    rows = [("name", "layers", "eff. params", "MMLU (PT)", "skipped", "FFN width of each kept layer")]
    for spec in table():
        skipped = ", ".join(map(str, spec.layers_to_skip)) or "-"
        rows.append((spec.name, str(len(spec.ffn_hidden_dims)), f"{spec.effective_params:.2f} B", spec.mmlu, skipped,
                     run_lengths(spec.ffn_hidden_dims)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    note = (f"Source: {TABLE_SOURCE}. Pass a name (\"Config for \" may be left out) or a JSON file "
            '{"ffn_hidden_dims": [...], "layers_to_skip": [...]} as --matformer / matformer=.')
    return "\n".join(lines + ["", note])


def main(argv=None) -> int:
    parser = command_parser("mlx_gemma3n.matformer", description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the table of published slices of E4B")
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return 0
    return run_command(lambda: print(table_text()))


if __name__ == "__main__":
    raise SystemExit(main())
