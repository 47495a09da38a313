"""Build the C++ kernels of one Inductor graph into a few shared libraries, not one each.

On a CPU, Inductor turns every fused kernel of a graph into its own C++ file and builds
each into its own shared library with its own ``g++`` call. Most of such a call is fixed
cost (starting the compiler, loading Inductor's 150 MB precompiled header, the Python
binding, the link), so graphs with many small kernels spend most of their compile time
on it: the 43 kernels of the learned rule's compiled meta step took 46 s of ``g++`` one
by one and 6.9 s in one file (measured here, same flags).

:func:`batched_cpp_kernels` is a context manager under which the kernels a generated
Inductor module asks for (``AsyncCompile.cpp_pybinding``) are collected instead of built;
when the module waits for them (``AsyncCompile.wait``, at the end of its code), they are
built together: each kernel in its own C++ namespace, in as many libraries as Inductor
has compile workers (with at least :data:`MIN_KERNELS_PER_LIBRARY` kernels each), with one
Python binding per kernel. The kernels, their flags and their arithmetic are Inductor's;
only how many files they are compiled in changes. A kernel whose source does not have
the expected shape, or a library that fails to build, falls back to Inductor's own path
for the kernels concerned (logged), so batching can cost time but not correctness.

metaopt's Inductor backend (:mod:`metaopt._inductor`) compiles every graph under it; other
``torch.compile`` calls in the process are untouched (the patch is installed only while a
metaopt compilation runs). The environment variable ``METAOPT_BATCH_CPP_KERNELS=0`` turns
it off (Inductor's own one-library-per-kernel path), read when a compilation starts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

log = logging.getLogger(__name__)

__all__ = ["DISABLE_VARIABLE", "MIN_KERNELS_PER_LIBRARY", "batched_cpp_kernels", "combined_source"]

DISABLE_VARIABLE = "METAOPT_BATCH_CPP_KERNELS"
"""Set to ``0`` to build each kernel on its own, as Inductor does."""

MIN_KERNELS_PER_LIBRARY = 4
"""A graph's kernels go into ``min(compile workers, n_kernels // 4)`` libraries (at least
one): each extra library costs one fixed compiler start, worth it only when it has
enough kernels to build in parallel with the others."""

_KERNEL_DEFINITION = re.compile(r'extern\s+"C"\s+void\s+kernel\s*\(')
_INTEGER_TYPES = {"int64_t", "long", "int"}
_FLOAT_TYPES = {"float", "double"}

_BINDING_PRELUDE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cstdlib>
#include <stdexcept>
#include <string>

// set at module initialisation from the address Inductor publishes for its own bindings
static void* (*metaopt_tensor_data)(PyObject* tensor);

static void* metaopt_pointer_arg(PyObject* args, Py_ssize_t n) {
    return metaopt_tensor_data(PyTuple_GET_ITEM(args, n));
}

static long long metaopt_integer_arg(PyObject* args, Py_ssize_t n) {
    long long value = PyLong_AsLongLong(PyTuple_GET_ITEM(args, n));
    if (value == -1 && PyErr_Occurred()) throw std::runtime_error("expected an int argument");
    return value;
}

static double metaopt_float_arg(PyObject* args, Py_ssize_t n) {
    double value = PyFloat_AsDouble(PyTuple_GET_ITEM(args, n));
    if (value == -1.0 && PyErr_Occurred()) throw std::runtime_error("expected a float argument");
    return value;
}

static void metaopt_check_args(PyObject* args, Py_ssize_t expected) {
    if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != expected)
        throw std::runtime_error("expected a tuple of " + std::to_string(expected) + " arguments");
}
"""

_BINDING_FUNCTION = """
static PyObject* {name}_py(PyObject*, PyObject* args) {{
    try {{
        metaopt_check_args(args, {n_args});
        {namespace}::kernel({call_args});
        Py_RETURN_NONE;
    }} catch (std::exception const& error) {{
        PyErr_SetString(PyExc_RuntimeError, error.what());
        return nullptr;
    }}
}}
"""

_MODULE_INIT = """
static PyMethodDef metaopt_methods[] = {{
{methods}
    {{nullptr, nullptr, 0, nullptr}}}};

static struct PyModuleDef metaopt_module = {{
    PyModuleDef_HEAD_INIT, "kernel", nullptr, -1, metaopt_methods}};

PyMODINIT_FUNC PyInit_kernel(void) {{
    const char* address = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    unsigned long long value = address ? std::strtoull(address, nullptr, 10) : 0;
    if (value == 0) {{
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR is not set");
        return nullptr;
    }}
    metaopt_tensor_data = reinterpret_cast<void* (*)(PyObject*)>(value);
    return PyModule_Create(&metaopt_module);
}}
"""


def _argument(argtype: str, index: int) -> str:
    """The C++ expression converting Python argument ``index`` to ``argtype``."""
    bare = argtype.replace("const ", "").strip()
    if bare.endswith("*"):
        return f"static_cast<{bare}>(metaopt_pointer_arg(args, {index}))"
    if bare in _INTEGER_TYPES:
        return f"static_cast<{bare}>(metaopt_integer_arg(args, {index}))"
    if bare in _FLOAT_TYPES:
        return f"static_cast<{bare}>(metaopt_float_arg(args, {index}))"
    raise ValueError(f"argument type {argtype!r} has no conversion")


class _KernelPart(NamedTuple):
    """One kernel's share of a combined source."""

    includes: list[str]
    body: str  # the source without its includes, ``kernel`` with C++ linkage
    call_args: str  # the C++ arguments converted from the Python call's tuple
    n_args: int


def _kernel_part(argtypes: Sequence[str], source: str) -> _KernelPart:
    """Split one kernel for :func:`combined_source` (``ValueError`` if it cannot be)."""
    lines = source.splitlines()
    includes = [line.strip() for line in lines if line.lstrip().startswith("#include")]
    body = "\n".join(line for line in lines if not line.lstrip().startswith("#include"))
    body, found = _KERNEL_DEFINITION.subn("void kernel(", body)
    if found != 1:
        raise ValueError(f"the kernel defines kernel() {found} times, expected once")
    call_args = ", ".join(_argument(t, j) for j, t in enumerate(argtypes))
    return _KernelPart(includes, body, call_args, len(argtypes))


def _assembled(parts: Sequence[_KernelPart]) -> str:
    """The source of :func:`combined_source` from its kernels' parts."""
    includes = dict.fromkeys(line for part in parts for line in part.includes)
    bodies, bindings, methods = [], [], []
    for i, part in enumerate(parts):
        namespace = f"metaopt_kernel_{i}"
        bodies.append(f"namespace {namespace} {{\n{part.body}\n}}  // namespace {namespace}")
        bindings.append(_BINDING_FUNCTION.format(
            name=f"kernel_{i}", n_args=part.n_args, namespace=namespace,
            call_args=part.call_args,
        ))
        methods.append(f'    {{"kernel_{i}", kernel_{i}_py, METH_VARARGS, nullptr}},')
    return "\n".join([
        *includes, *bodies, _BINDING_PRELUDE, *bindings,
        _MODULE_INIT.format(methods="\n".join(methods)),
    ])


def combined_source(kernels: Sequence[tuple[Sequence[str], str]]) -> str:
    """One C++ source defining the Python functions ``kernel_0 ... kernel_{n-1}`` of a
    module ``kernel``.

    Args:
        kernels: ``(argtypes, source)`` of each kernel, as Inductor passes them to
            ``AsyncCompile.cpp_pybinding``: the C++ types of the kernel's arguments and a
            source defining ``extern "C" void kernel(...)``.

    Returns:
        The sources' ``#include`` lines (each once, in order of first use), then each
        source in a namespace of its own with ``kernel`` given C++ linkage, then the
        bindings.

    Raises:
        ValueError: a source does not define ``kernel`` exactly once in that form, or an
            argument type has no conversion.
    """
    return _assembled([_kernel_part(argtypes, source) for argtypes, source in kernels])


@functools.cache
def _library_cache() -> Any:
    """Inductor's cache of C++ libraries with Python bindings, subclassed so that its
    entries (whole libraries of kernels) stay apart from the one-kernel ones."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class KernelLibraries(CppPythonBindingsCodeCache):
        cache: ClassVar[dict[str, Any]] = {}

    return KernelLibraries


def _chunks(sizes: Sequence[int], n_libraries: int) -> list[list[int]]:
    """Kernel indices split into ``n_libraries`` groups of about equal source size
    (largest first, each to the smallest group)."""
    groups: list[list[int]] = [[] for _ in range(n_libraries)]
    totals = [0] * n_libraries
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        g = totals.index(min(totals))
        groups[g].append(i)
        totals[g] += sizes[i]
    return [sorted(g) for g in groups if g]


class _KernelBatch:
    """The kernels one generated module asked for, built together on the first
    :meth:`kernel` call."""

    def __init__(self, submit: Callable[..., Any] | None) -> None:
        self.submit = submit
        self.sources: list[tuple[list[str], str]] = []
        self.kernels: list[Callable[..., Any]] | None = None

    def add(self, argtypes: Sequence[str], source: str) -> _PendingKernel:
        self.sources.append((list(argtypes), source))
        return _PendingKernel(self, len(self.sources) - 1)

    def kernel(self, index: int) -> Callable[..., Any]:
        if self.kernels is None:
            self.kernels = self._build()
        return self.kernels[index]

    def _build(self) -> list[Callable[..., Any]]:
        from torch._inductor.async_compile import get_compile_threads

        start = time.perf_counter()
        n = len(self.sources)
        parts: dict[int, _KernelPart] = {}
        for i, (argtypes, source) in enumerate(self.sources):
            try:
                parts[i] = _kernel_part(argtypes, source)
            except ValueError as error:
                log.debug("kernel %d is built on its own: %s", i, error)
        fit = list(parts)
        n_libraries = max(1, min(get_compile_threads(), len(fit) // MIN_KERNELS_PER_LIBRARY))
        groups = [
            [fit[j] for j in group]
            for group in _chunks([len(self.sources[i][1]) for i in fit], n_libraries)
        ]
        pending = [(group, self._submit([parts[i] for i in group])) for group in groups]
        kernels = [None if i in parts else self._alone(i) for i in range(n)]
        for group, load in pending:
            try:
                module = load() if load is not None else None
            except Exception as error:  # any build failure falls back
                _log_fallback(len(group), error)
                module = None
            for j, i in enumerate(group):
                kernels[i] = getattr(module, f"kernel_{j}") if module else self._alone(i)
        log.debug(
            "built %d C++ kernels in %d libraries (%d on their own) in %.2f s", n,
            len(groups), n - len(fit), time.perf_counter() - start,
        )
        return kernels  # type: ignore[return-value]

    def _submit(self, parts: list[_KernelPart]) -> Callable[[], Any] | None:
        """Start building a library of these kernels; ``None`` when that fails at once
        (each kernel is then built on its own)."""
        try:
            return _library_cache().load_async(_assembled(parts), "cpu", submit_fn=self.submit)
        except Exception as error:  # any build failure falls back
            _log_fallback(len(parts), error)
            return None

    def _alone(self, index: int) -> Callable[..., Any]:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        argtypes, source = self.sources[index]
        return CppPythonBindingsCodeCache.load_pybinding(argtypes, source)


def _log_fallback(n_kernels: int, error: Exception) -> None:
    log.warning(
        "building %d kernels in one library failed (%s); building them one by one",
        n_kernels, error,
    )


class _PendingKernel:
    """What the patched ``cpp_pybinding`` returns: resolved by the patched ``wait`` (or,
    called before, on its first call)."""

    def __init__(self, batch: _KernelBatch, index: int) -> None:
        self.batch = batch
        self.index = index

    def result(self, timeout: float | None = None) -> Callable[..., Any]:
        return self.batch.kernel(self.index)

    def __call__(self, *args: Any) -> Any:
        return self.result()(*args)


_lock = threading.Lock()
_depth = 0
_originals: dict[str, Any] = {}
"""``AsyncCompile``'s own methods, kept from the first patch on."""


def _batching_cpp_pybinding(self: Any, argtypes: list[str], source_code: str) -> Any:
    batch = self.__dict__.get("_metaopt_kernel_batch")
    if batch is None or batch.kernels is not None:
        from torch._inductor.async_compile import get_compile_threads

        batch = _KernelBatch(type(self).submit if get_compile_threads() > 1 else None)
        self.__dict__["_metaopt_kernel_batch"] = batch
    return batch.add(argtypes, source_code)


def _resolving_wait(self: Any, scope: dict[str, Any]) -> None:
    for key, value in list(scope.items()):
        if isinstance(value, _PendingKernel):
            scope[key] = value.result()
    _originals["wait"](self, scope)


def _patchable() -> bool:
    try:
        from torch._inductor.async_compile import AsyncCompile, get_compile_threads  # noqa: F401
        from torch._inductor.codecache import CppPythonBindingsCodeCache
    except ImportError:
        return False
    return all(hasattr(AsyncCompile, name) for name in ("cpp_pybinding", "wait", "submit")) and (
        hasattr(CppPythonBindingsCodeCache, "load_async")
    )


@contextlib.contextmanager
def batched_cpp_kernels() -> Iterator[None]:
    """While active (re-entrant, process-wide), Inductor builds each generated module's
    C++ kernels a few libraries at a time instead of one library each (see the module
    doc). A no-op where this torch's Inductor lacks the hooks it patches or
    ``METAOPT_BATCH_CPP_KERNELS=0``."""
    global _depth
    if os.environ.get(DISABLE_VARIABLE, "1") == "0" or not _patchable():
        yield
        return
    from torch._inductor.async_compile import AsyncCompile

    with _lock:
        if _depth == 0:
            _originals.setdefault("cpp_pybinding", AsyncCompile.cpp_pybinding)
            _originals.setdefault("wait", AsyncCompile.wait)
            AsyncCompile.cpp_pybinding = _batching_cpp_pybinding
            AsyncCompile.wait = _resolving_wait
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                AsyncCompile.cpp_pybinding = _originals["cpp_pybinding"]
                AsyncCompile.wait = _originals["wait"]
