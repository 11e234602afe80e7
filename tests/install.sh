#!/usr/bin/env bash
# Installs the package and its test stack in the active Python environment, in the order that keeps
# the CPU build of torch: torch first, then torchvision without its deps, then the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/test_chat_page.py: a real browser. Playwright's own browser download cannot run here, so the
# tests launch Debian's chromium by its path.
if ! command -v chromium > /dev/null; then
    as_root=$([ "$(id -u)" = 0 ] || echo sudo)
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium > /dev/null
fi
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps torchvision==0.28.0
python -m pip install -q -e ".[test]"
python - <<'PY'
from importlib.metadata import version  # importing torchvision itself needs the test hooks
torch = version("torch")
assert torch.startswith("2.13.0"), f"torch {torch} was replaced by another build"
print(f"test stack ready: torch {torch}, torchvision {version('torchvision')}, transformers {version('transformers')}")
PY
