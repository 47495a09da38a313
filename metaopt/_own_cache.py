"""Give a function its own ``torch.compile`` cache.

Dynamo keeps compiled graphs per *code object* and recompiles at most
``torch._dynamo.config.recompile_limit`` times (8 by default) per code object; with
``fullgraph=True`` the next recompilation is a hard error. Every step metaopt builds
(``make_step``, ``make_meta_step``, a compiled optimizer) runs the same few Python
functions, so without this a process that builds steps for nine models would fail. A copy
with its own code object starts its own cache.

:func:`compile_own` is how metaopt calls ``torch.compile``: on such a copy, and with
Inductor's generated size/stride assertions off (``size_asserts``: a check of every
extern kernel's output layout at every call, 3-6 % of a small compiled meta step's time
here) unless the caller sets ``options`` or ``mode`` itself.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from metaopt._inductor import inductor

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["compile_own", "with_own_cache"]

INDUCTOR_OPTIONS = {"size_asserts": False}
"""Inductor options :func:`compile_own` passes unless told otherwise."""


def with_own_cache(fn: F) -> F:
    """A copy of ``fn`` (a plain function, or a method bound to an object) with a code
    object of its own, hence a ``torch.compile`` cache of its own."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(with_own_cache(fn.__func__), fn.__self__)  # type: ignore[return-value]
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"with_own_cache needs a Python function, got {type(fn).__name__}")
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return copy  # type: ignore[return-value]


def compile_own(
    fn: Callable[..., Any],
    *,
    default_options: dict[str, Any] = INDUCTOR_OPTIONS,
    **compile_kwargs: Any,
) -> Callable[..., Any]:
    """``torch.compile(with_own_cache(fn), **compile_kwargs)``, with ``default_options``
    (:data:`INDUCTOR_OPTIONS` unless given) added when the backend is Inductor (the
    default) and neither ``options`` nor ``mode`` is given (``torch.compile`` accepts only
    one of the two). Inductor is :func:`metaopt._inductor.inductor` (Inductor without
    torch 2.13's wrong max-pool backward decomposition), with the same ``mode`` and
    ``options``."""
    if compile_kwargs.get("backend", "inductor") == "inductor":
        compile_kwargs["backend"] = inductor
        if "options" not in compile_kwargs and "mode" not in compile_kwargs:
            compile_kwargs["options"] = dict(default_options)
    return torch.compile(with_own_cache(fn), **compile_kwargs)
