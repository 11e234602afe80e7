"""An agent loop: the model may call two Python functions; the loop runs each call, hands the results
back, and prints the model's final answer. The calls it makes are shown on stderr.

    python examples/tools.py --model google/gemma-3n-E2B-it \\
        --question "How many days are left until 2027-01-01, and what time is it in Tokyo?"

Each call is generated under a grammar of the functions' schemas (from their type hints), so its
name and arguments always parse; a function that fails hands its error back as its result.
"""

import argparse
import json
import sys
from datetime import date, datetime
from zoneinfo import ZoneInfo

from mlx_gemma3n import generate, load
from mlx_gemma3n.errors import run_command


def current_time(timezone: str) -> str:
    """The current local time somewhere.

    Args:
        timezone: an IANA time zone, such as "Europe/Paris" or "Asia/Tokyo"
    """
    return datetime.now(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M")


def days_between(start: str, end: str) -> int:
    """The number of days from one date to another.

    Args:
        start: the first date, as YYYY-MM-DD
        end: the second date, as YYYY-MM-DD
    """
    return (date.fromisoformat(end) - date.fromisoformat(start)).days


FUNCTIONS = {function.__name__: function for function in (current_time, days_between)}


def run_call(call: dict) -> str:
    """A call's result as text, or the error it raised."""
    function = FUNCTIONS[call["function"]["name"]]
    try:
        return json.dumps(function(**json.loads(call["function"]["arguments"])))
    except Exception as exc:  # noqa: BLE001 -- the model reads what went wrong
        return f"error: {type(exc).__name__}: {exc}"


def answer(model, processor, question: str, max_steps: int, require_call: bool, today: str, **sampling) -> str:
    messages = [{"role": "system", "content": f"Today is {today}."}, {"role": "user", "content": question}]
    for step in range(max_steps):
        choice = "required" if require_call and step == 0 else "auto"
        reply = generate(model, processor, messages, tools=list(FUNCTIONS.values()), tool_choice=choice, **sampling)
        if not reply.tool_calls:
            return reply.content or ""
        messages.append({"role": "assistant", "content": None, "tool_calls": reply.tool_calls})
        for call in reply.tool_calls:
            result = run_call(call)
            print(f"-> {call['function']['name']}({call['function']['arguments']}) = {result}", file=sys.stderr)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    # out of steps: the answer from what the calls gave
    return generate(model, processor, messages, tools=list(FUNCTIONS.values()), tool_choice="none", **sampling).content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/gemma-3n-E2B-it", help="model folder or Hugging Face hub id")
    parser.add_argument("--question", default="How many days are left until 2027-01-01, and what time is it in Tokyo?")
    parser.add_argument("--max-steps", type=int, default=4, help="rounds of calls before the model must answer")
    parser.add_argument("--require-call", action="store_true", help="the first reply must call a function")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temp", type=float, help="sampling temperature (0 = greedy; default: the model's)")
    parser.add_argument("--today", type=date.fromisoformat, default=date.today(), help="the date the model is told it is (YYYY-MM-DD; default: today)")
    args = parser.parse_args()

    model, processor = load(args.model)
    print(answer(model, processor, args.question, args.max_steps, args.require_call, args.today.isoformat(),
                 max_tokens=args.max_tokens, temperature=args.temp))


if __name__ == "__main__":
    sys.exit(run_command(main))
