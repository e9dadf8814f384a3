"""Run a function right after a module is first imported (a post-import hook).

Why: vLLM loads general plugins in every process (API server, engine core,
workers) for every model. Importing the modules the patches wrap (the OpenAI
serving layer, the renderer, the async engine client) just to wrap them would
make every one of those processes pay for code it may never use. Instead each
patch is installed when its module is imported, by whoever imports it, or at
once if it already is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType

Hook = Callable[[ModuleType], None]


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a watched module."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Hook]] = {}
        self._searching = threading.local()

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[override]
        searching: set[str] = self._searching.__dict__.setdefault("names", set())
        if fullname not in self.hooks or fullname in searching:
            return None
        searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders' answer
        finally:
            searching.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        hooks = self.hooks.pop(fullname)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_hooks(module: ModuleType) -> None:
            exec_module(module)
            for hook in hooks:
                hook(module)

        loader.exec_module = exec_then_hooks  # type: ignore[method-assign]
        return spec


_finder = _PostImportFinder()
_lock = threading.Lock()


def when_imported(module_name: str, hook: Hook) -> None:
    """Call ``hook(module)`` once ``module_name`` is imported (now, if it already is)."""
    with _lock:
        module = sys.modules.get(module_name)
        if module is None:
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            _finder.hooks.setdefault(module_name, []).append(hook)
            return
    hook(module)
