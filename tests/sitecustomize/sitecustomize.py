"""Test-only interpreter start-up hook (put on PYTHONPATH by tests/conftest.py).

The test environment has a CPU torch plus a torchvision installed with
``--no-deps`` whose compiled ops cannot load. ``import torchvision`` (pulled in
by timm and by transformers' Gemma 3n config / tokenizer / processor modules)
then dies with "operator torchvision::nms does not exist" unless the
``torchvision::nms`` and ``torchvision::qnms`` op schemas are defined first.

This module makes that work in every Python process started with the
test-suite's environment (e.g. ``python -m mlx_gemma3n.generate ...`` run from
a test):

* if torch is already imported, the schemas are defined right away;
* otherwise a meta-path finder defines them the moment anything tries to find
  or import ``torchvision`` -- so processes that never touch
  torch/torchvision (the plain MLX runtime) do not pay for importing torch,
  and processes without torch installed are unaffected (ImportError is
  swallowed);
* a torchvision whose compiled extension does load is left alone (the
  schemas are only defined when ``torchvision/_C`` fails to load).

Any other ``sitecustomize`` module further down ``sys.path`` is still executed
afterwards (this file shadows it on PYTHONPATH).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_TORCHVISION_LIB = None  # must stay alive: dropping the Library undefines the ops

# Schemas as in torchvision's C++ sources (csrc/ops/nms.cpp, quantized qnms)
# and its fake registrations in torchvision/_meta_registrations.py.
_TORCHVISION_SCHEMAS = (
    ("nms", "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
    ("qnms", "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
)


def _schema_defined(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _torchvision_extension_loads(torch) -> bool:
    """True if torchvision's compiled ``_C`` extension loads in this process.

    Located without importing torchvision (exactly like
    torchvision._internally_replaced_utils._get_extension_path). When it loads,
    it registers the real op schemas itself and defining them here first would
    make its own registration fail, so a healthy torchvision is left alone.
    """
    if "torchvision.extension" in sys.modules:
        try:
            return bool(sys.modules["torchvision.extension"]._has_ops())
        except Exception:
            return False
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    loader_details = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for lib_dir in spec.submodule_search_locations:
        ext = importlib.machinery.FileFinder(lib_dir, loader_details).find_spec("_C")
        if ext is not None and ext.origin:
            try:
                torch.ops.load_library(ext.origin)  # same call torchvision makes; a later repeat is a no-op
                return True
            except (OSError, ImportError):
                return False
    return False


def define_torchvision_op_schemas() -> bool:
    """Define ``torchvision::nms`` / ``torchvision::qnms`` unless they exist.

    Idempotent: does nothing when the schemas are already registered (by an
    earlier call, or by torchvision's own extension) or when torchvision's
    compiled extension loads fine. Returns False when torch is not
    importable, True otherwise.
    """
    global _TORCHVISION_LIB
    try:
        import torch
    except ImportError:
        return False
    missing = [(n, s) for n, s in _TORCHVISION_SCHEMAS if not _schema_defined(torch, n)]
    if not missing or _torchvision_extension_loads(torch):
        return True
    for name, schema in missing:
        if _schema_defined(torch, name):
            continue
        if _TORCHVISION_LIB is None:
            _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
        _TORCHVISION_LIB.define(schema)
    return True


class _TorchvisionSchemaFinder(importlib.abc.MetaPathFinder):
    """Runs define_torchvision_op_schemas() before torchvision is located.

    Never finds anything itself (returns None) so the normal finders import
    the real package.
    """

    _gemma3n_torchvision_schema_finder = True

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401
        if fullname == "torchvision" and not self._busy:
            self._busy = True
            try:
                define_torchvision_op_schemas()
            except Exception:  # never break an import from a start-up hook
                pass
            finally:
                self._busy = False
        return None


def install() -> None:
    """Install the lazy hook once per process (and define now if torch is loaded)."""
    if "torch" in sys.modules:
        try:
            define_torchvision_op_schemas()
        except Exception:
            pass
    if not any(getattr(f, "_gemma3n_torchvision_schema_finder", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionSchemaFinder())


def _chain_next_sitecustomize() -> None:
    """Execute the next ``sitecustomize`` on sys.path (the one this file shadows)."""
    if __name__ != "sitecustomize":
        return
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.origin is None or os.path.abspath(spec.origin) == os.path.abspath(__file__):
        return
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    except Exception:
        pass


install()
_chain_next_sitecustomize()
