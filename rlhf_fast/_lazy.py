"""Lazy package exports: a public name's module is imported on first access, then cached.

Used by ``rlhf_fast`` and ``rlhf_fast.rlhf`` so that importing either stays cheap (no Triton, no
extension build, no torch.distributed) until a name is actually used.
"""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """(``__getattr__``, ``__dir__``) for the package `package` whose globals are `namespace`.

    exports: public name -> module defining it. The first access imports that module and stores the
    value in `namespace`, so later lookups never reach ``__getattr__`` again.
    """
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
