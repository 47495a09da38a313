"""``torch.optim.Optimizer`` drop-ins over any functional :class:`~metaopt.rules.UpdateRule`.

The functional rule does the arithmetic; this shell does what ``torch.optim`` users rely
on: ``param_groups`` with their own hyper-parameters (read at every step, so every
``torch.optim.lr_scheduler`` works), per-parameter state in ``self.state[p]``,
``state_dict()``/``load_state_dict()``, ``zero_grad()``, closures and ``add_param_group``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from metaopt._own_cache import compile_own
from metaopt.rules.base import UpdateRule

__all__ = ["TORCH_OPTIM_FLAGS", "FunctionalOptimizer"]

RuleFactory = Callable[..., UpdateRule]

_SavedState = dict[torch.Tensor, dict[str, tuple[torch.dtype, torch.Tensor]]]
"""What :meth:`FunctionalOptimizer.load_state_dict` restores: per parameter, each state
key's dtype (as the rule gives it) and the tensor the state dict holds."""


_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


@contextlib.contextmanager
def _autocast_off() -> Iterator[None]:
    """Autocast turned off for every device type where it is on (none entered where it
    is off: this runs at every step)."""
    with contextlib.ExitStack() as stack:
        for device_type in _AUTOCAST_DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _flatten_leaf_state(leaf_state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """A leaf state pytree as ``({path: tensor}, spec)`` for ``optimizer.state[p]``."""
    with_path, spec = pytree.tree_flatten_with_path(leaf_state)
    flat = {}
    for path, leaf in with_path:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"rule state leaves must be tensors, got {type(leaf).__name__}")
        flat[pytree.keystr(path) or "value"] = leaf
    return flat, spec


def _describe(flat: dict[str, Any]) -> dict[str, tuple[int, ...] | str]:
    return {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        for k, v in flat.items()
    }


def _update_group(
    rule: UpdateRule,
    keys: list[str],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: dict[str, Any],
) -> dict[str, Any]:
    """``params += rule.update(grads)`` in place over one group; returns the new state."""
    named_params = dict(zip(keys, params, strict=True))
    updates, new_state = rule.update(dict(zip(keys, grads, strict=True)), state, named_params)
    torch._foreach_add_(params, [updates[k].to(p.dtype) for k, p in named_params.items()])
    return new_state


def _as_real(x: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its ``torch.view_as_real`` view (``[..., 2]``), others as is."""
    return torch.view_as_real(x) if x.is_complex() else x


def _as_complex_like(new: Any, old: Any) -> Any:
    """``new`` (a leaf state computed on real views) with every tensor that is complex in
    ``old`` (the leaf state it came from) turned back into a complex tensor."""
    new_leaves, spec = pytree.tree_flatten(new)
    old_leaves, old_spec = pytree.tree_flatten(old)
    if spec != old_spec:  # another layout: nothing to match the leaves by
        return new
    return pytree.tree_unflatten(
        [
            torch.view_as_complex(n.contiguous())
            if isinstance(o, torch.Tensor)
            and o.is_complex()
            and isinstance(n, torch.Tensor)
            and not n.is_complex()
            else n
            for n, o in zip(new_leaves, old_leaves, strict=True)
        ],
        spec,
    )


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``torch.view_as_real`` of a tensor of ``dtype`` (itself if real)."""
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the finite check accumulates gradient norms of ``dtype`` in: float32 for
    the half-precision ones (whose own range would overflow at a norm of 65,504 for
    float16), their own otherwise (``None``)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


TORCH_OPTIM_FLAGS = (
    "maximize",
    "amsgrad",
    "nesterov",
    "decoupled_weight_decay",
    "differentiable",
    "weight_decay",
)
"""Parameter-group keys with which ``torch.optim`` optimizers change what they compute.
A group that sets one of them (to a truthy value) while the rule does not take it is
rejected (see :meth:`FunctionalOptimizer.add_param_group`)."""


class FunctionalOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a functional update rule.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer
            (named parameters are accepted too, as in ``torch.optim``).
        rule: either a *rule factory* such as :func:`metaopt.rules.adam`, called with each
            group's hyper-parameters at every step, or a ready :class:`UpdateRule` (whose
            hyper-parameters are then fixed; no ``lr`` for schedulers to change).
        check_finite: raise ``FloatingPointError`` before touching anything when a
            gradient holds NaN or inf (default). ``False`` skips the check (one device
            sync per step) and lets non-finite values flow into parameters.
        compile: run each group's update (``rule.update`` over all its parameters and the
            in-place addition) through ``torch.compile``, one compiled function per
            parameter layout (device type, dtypes and shapes). Every non-zero float
            hyper-parameter (``lr``, each of ``betas``, ``eps``, ...) is then passed to the
            factory as a 0-d tensor (float64 on CPU and CUDA, as precise as the number),
            so schedulers that change them (``OneCycleLR`` cycles ``betas``) do not
            recompile; zeros stay numbers (they may switch a transform off), so a change
            to or from 0 compiles once more. A factory that refuses tensors gets numbers.
            Parameters on the ``meta`` device are updated eagerly.
        **hyper: hyper-parameters for ``rule`` (a factory); missing ones take the
            factory's defaults, so ``group["lr"]`` always exists when the factory has ``lr``.

    Complex parameters are updated as ``torch.optim`` does: the rule runs on
    ``torch.view_as_real`` views of the parameters, gradients and complex state (the state
    stays complex in ``optimizer.state[p]``). Parameters on the ``meta`` device are
    stepped (shapes only; the finite check skips them). Copies
    (``copy.deepcopy``, ``pickle``) step like the original; step hooks are not copied
    (as in ``torch.optim``), compiled functions are rebuilt, and a ready ``UpdateRule``
    made of closures can be deep-copied but not pickled (pass a factory for that).

    Example:
        >>> opt = FunctionalOptimizer(model.parameters(), metaopt.rules.adam, lr=1e-3)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    """

    _TENSOR_HYPERS: frozenset[str] | None = None
    """With ``compile=True``: the hyper-parameters passed to the factory as 0-d tensors
    when they are non-zero floats (``None``: all of them)."""

    _PICKLED: tuple[str, ...] = (
        "check_finite",
        "_compile",
        "_factory",
        "_fixed_rule",
        "_hyper_names",
    )
    """Attributes that ``copy.deepcopy`` / ``pickle`` carry besides ``torch.optim``'s
    ``defaults``, ``state`` and ``param_groups``; the others are rebuilt
    (:meth:`_reset_transient`)."""

    def __init__(
        self,
        params: Iterable[Any],
        rule: RuleFactory | UpdateRule,
        *,
        check_finite: bool = True,
        compile: bool = False,
        **hyper: Any,
    ) -> None:
        if isinstance(rule, UpdateRule):
            if hyper:
                raise TypeError(
                    f"hyper-parameters {sorted(hyper)} need a rule factory (e.g. "
                    "metaopt.rules.adam), not a ready UpdateRule whose values are fixed"
                )
            self._factory: RuleFactory | None = None
            self._fixed_rule: UpdateRule | None = rule
            self._hyper_names: frozenset[str] = frozenset()
            defaults: dict[str, Any] = {}
        elif callable(rule):
            self._factory, self._fixed_rule = rule, None
            defaults = self._factory_defaults(rule, hyper)
            self._hyper_names = frozenset(defaults) | self._signature_names(rule)
        else:
            raise TypeError(f"rule must be an UpdateRule or a factory, got {type(rule).__name__}")
        self.check_finite = check_finite
        self._compile = compile
        self._reset_transient()
        super().__init__(params, defaults)

    def _reset_transient(self) -> None:
        """(Re)build what is not copied with the optimizer: the compiled update functions
        and the caches keyed by tensors and groups."""
        # compile=True: one compiled update per parameter layout (see _update_for)
        self._updates: dict[tuple[Any, ...], Callable[..., dict[str, Any]]] = {}
        self._update_of_params: dict[tuple[int, ...], Callable[..., dict[str, Any]]] = {}
        # per parameter: the pytree structure of its rule state and the self.state[p] keys
        # of its leaves (their key paths, built once per structure)
        self._layouts: dict[torch.Tensor, tuple[Any, tuple[str, ...]]] = {}
        self._rule_cache: dict[int, tuple[Any, UpdateRule]] = {}
        # per group: the rule_for() rule it was built from (and dtype, device), the rule
        # with tensor hyper-parameters (compile=True)
        self._tensor_rules: dict[int, tuple[tuple[Any, ...], UpdateRule]] = {}
        # the names given with the parameters (kept when a framework replaces a group's
        # parameter list and its param_names no longer fit), and the identities of all
        # groups' parameters when they were last looked at (see _sync_params)
        self._names: dict[torch.Tensor, str] = {}
        self._synced: tuple[int, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._PICKLED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_transient()

    @staticmethod
    def _factory_defaults(factory: RuleFactory, hyper: dict[str, Any]) -> dict[str, Any]:
        """The factory's keyword defaults overridden by ``hyper``; unknown names rejected."""
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            return dict(hyper)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        named = {
            name: p.default
            for name, p in signature.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        unknown = set(hyper) - set(named)
        if unknown and not accepts_any:
            raise TypeError(
                f"{getattr(factory, '__name__', factory)!s} has no hyper-parameter(s) "
                f"{sorted(unknown)}; it takes {sorted(named)}"
            )
        defaults = {k: v for k, v in named.items() if v is not inspect.Parameter.empty}
        defaults.update(hyper)
        missing = set(named) - set(defaults)
        if missing:
            raise TypeError(f"missing hyper-parameter(s) {sorted(missing)} for the rule factory")
        return defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim``); its hyper-parameters are validated by building
        its rule, and an invalid group is not added.

        Raises:
            ValueError: the group turns on a behaviour of ``torch.optim`` (see
                :data:`TORCH_OPTIM_FLAGS`) that the rule does not take, e.g.
                ``{"maximize": True}`` or ``{"weight_decay": 0.01}`` for a rule without
                weight decay: silently minimising, or not decaying, would train something
                else than asked. Keys the rule does not know are otherwise kept and
                ignored, as ``torch.optim`` does (frameworks store their own there).
        """
        super().add_param_group(param_group)
        try:
            self._check_flags(self.param_groups[-1])
            self.rule_for(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _check_flags(self, group: dict[str, Any]) -> None:
        """``ValueError`` for a :data:`TORCH_OPTIM_FLAGS` entry of ``group`` that is set
        (truthy) and that the rule does not take."""
        for flag in TORCH_OPTIM_FLAGS:
            if group.get(flag) and flag not in self._hyper_names:
                rule = (
                    getattr(self._factory, "__name__", "the rule factory")
                    if self._factory is not None
                    else "a ready UpdateRule"
                )
                raise ValueError(
                    f"a parameter group sets {flag}={group[flag]!r}, which {rule} does not "
                    f"take (its hyper-parameters: {sorted(self._hyper_names)}); remove the "
                    "key or choose a rule that has it"
                )

    # ------------------------------------------------------------------ rules and keys
    def rule_for(self, group: dict[str, Any]) -> UpdateRule:
        """The :class:`UpdateRule` for a parameter group, built from its current values."""
        if self._fixed_rule is not None:
            return self._fixed_rule
        assert self._factory is not None
        kwargs = {k: group[k] for k in self._hyper_names if k in group}
        try:
            cache_key: Any = tuple(sorted(kwargs.items()))
            hash(cache_key)
        except TypeError:
            cache_key = None
        cached = self._rule_cache.get(id(group))
        if cache_key is not None and cached is not None and cached[0] == cache_key:
            return cached[1]
        rule = self._factory(**kwargs)
        if cache_key is not None:
            self._rule_cache[id(group)] = (cache_key, rule)
        return rule

    @staticmethod
    def _signature_names(factory: RuleFactory) -> frozenset[str]:
        """Keyword parameter names of the factory (per-group extras are passed too)."""
        try:
            parameters = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):
            return frozenset()
        return frozenset(
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    def param_keys(self, group: dict[str, Any]) -> list[str]:
        """Keys naming the group's parameters for the rule: names when the optimizer was
        given named parameters, otherwise positions in the group (``"0"``, ``"1"``, ...).

        When a framework has replaced the group's parameter list (so that its
        ``param_names`` no longer fit), parameters keep the names they were given with
        and the others get their positions (all get positions if that would repeat a
        key)."""
        params = group["params"]
        names = group.get("param_names")
        if names is not None and len(names) == len(params):
            return list(names)
        keys = [self._names.get(p, str(i)) for i, p in enumerate(params)]
        if len(set(keys)) == len(keys):
            return keys
        return [str(i) for i in range(len(params))]

    def _sync_params(self) -> None:
        """Follow edits of the groups' parameter lists since the last call (frameworks
        such as Avalanche replace ``param_groups[0]["params"]`` between tasks): remember
        the names that fit, forget what was cached for parameters no longer optimised
        (their tensors would stay alive), and tell :meth:`_params_changed`. A tuple of
        identities compared per call: nothing else happens while the lists are the
        same."""
        params = [p for group in self.param_groups for p in group["params"]]
        ids = tuple(map(id, params))
        if ids == self._synced:
            return
        self._synced = ids
        for group in self.param_groups:
            names = group.get("param_names")
            if names is not None and len(names) == len(group["params"]):
                self._names.update(zip(group["params"], names, strict=True))
        self._update_of_params.clear()
        present = set(ids)
        for cache in (self._names, self._layouts):
            for p in [p for p in cache if id(p) not in present]:
                del cache[p]
        self._params_changed(params)

    def _params_changed(self, params: list[torch.Tensor]) -> None:
        """Called by :meth:`_sync_params` with all groups' parameters, in order, when
        the parameter lists have changed (nothing to do here)."""

    # ------------------------------------------------------------------ state
    def _leaf_state(self, rule: UpdateRule, key: str, p: torch.Tensor) -> Any:
        """The rule's leaf state for ``p``: rebuilt from ``self.state[p]`` or initialised."""
        flat = self.state[p]
        if not flat:  # never initialised, or emptied by a framework: start afresh
            leaf_state = rule.init({key: p})[key]
            initial, spec = _flatten_leaf_state(leaf_state)
            self._layouts[p] = (spec, tuple(initial))
            return leaf_state
        layout = self._layouts.get(p)
        if layout is None:
            expected, spec = _flatten_leaf_state(rule.init({key: p})[key])
            layout = self._layouts[p] = (spec, tuple(expected))
        keys = layout[1]
        # by key, not by position: a framework (or a state_dict) may hold them in any order;
        # checked here for a layout just built and a cached one alike
        if len(flat) != len(keys) or not all(map(flat.__contains__, keys)):
            raise RuntimeError(
                f"optimizer.state for parameter {key!r} holds {sorted(flat)}, the rule "
                f"expects {sorted(keys)}"
            )
        return pytree.tree_unflatten([flat[k] for k in keys], layout[0])

    def _store(self, p: torch.Tensor, leaf_state: Any) -> None:
        leaves, spec = pytree.tree_flatten(leaf_state)
        layout = self._layouts.get(p)
        if (
            layout is not None
            and spec == layout[0]
            and all(isinstance(leaf, torch.Tensor) for leaf in leaves)
        ):
            # the layout known for p: its keys again (building the key paths at every
            # step took half the Python time of a compiled MLP step())
            self.state[p] = dict(zip(layout[1], leaves, strict=True))
            return
        flat, spec = _flatten_leaf_state(leaf_state)  # a non-tensor leaf raises here
        self.state[p] = flat
        self._layouts[p] = (spec, tuple(flat))

    # ------------------------------------------------------------------ step
    def _gather(self) -> list[tuple[dict[str, Any], list[str], list[torch.Tensor]]]:
        """Per group: the keys and parameters that have a gradient; validates them."""
        plan = []
        for group in self.param_groups:
            keys, params = [], []
            for key, p in zip(self.param_keys(group), group["params"], strict=True):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter {key!r}); use torch.optim.SparseAdam for those"
                    )
                keys.append(key)
                params.append(p)
            if params:
                plan.append((group, keys, params))
        return plan

    @staticmethod
    def _raise_if_nonfinite(plan: list[tuple[dict[str, Any], list[str], list[torch.Tensor]]]):
        """``FloatingPointError`` naming the first parameter with a NaN/inf gradient.
        Gradients on the ``meta`` device hold no values and are not checked.

        One ``torch._foreach_norm`` per device and dtype (float16 and bfloat16 gradients
        accumulate in float32): a NaN or inf makes a norm non-finite. A norm that
        overflows while every element is finite only sends the check to its exact
        per-tensor pass, which then finds nothing."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for _, _, params in plan:
            for p in params:
                if p.grad.device.type != "meta":
                    by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        if all(
            bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, 2, _norm_dtype(d)))).all())
            for (_, d), grads in by_kind.items()
        ):
            return
        for gi, (_, keys, params) in enumerate(plan):
            for key, p in zip(keys, params, strict=True):
                if p.grad.device.type == "meta":
                    continue
                if not bool(torch.isfinite(p.grad).all()):
                    raise FloatingPointError(
                        f"non-finite gradient (NaN or inf) for parameter {key!r} in group "
                        f"{gi}; no parameter or state was changed. Pass check_finite=False "
                        "to disable this check."
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient.

        The closure runs with autograd on and the caller's autocast; the update runs with
        autocast off, in the parameters' and the state's dtypes (a rule with a network of
        its own, the learned rule, computed it in bfloat16 under autocast otherwise).

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.
        """
        # subclasses customise _closure_loss, not step: torch.optim wraps every class's
        # own step with the hook runner, and a step calling super().step() ran them twice
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._closure_loss(loss)
        try:
            with _autocast_off():
                self._update_groups()
        finally:
            self._closure_loss(None)
        return loss

    def _closure_loss(self, loss: Any) -> None:
        """Given the closure's return value (``None`` without one) before the update and
        ``None`` after it, for subclasses whose rule observes losses (nothing here)."""

    def _update_groups(self) -> None:
        """The update of :meth:`step`: every parameter with a gradient, group by group,
        after checking every group's gradients and hyper-parameters."""
        self._sync_params()
        plan = self._gather()
        if self.check_finite:
            self._raise_if_nonfinite(plan)
        for group, _, _ in plan:  # every group's hyper-parameters are valid before any step
            self.rule_for(group)
        for group, keys, params in self._update_calls(plan):
            self._step_group(group, keys, params)

    def _update_calls(
        self, plan: list[tuple[dict[str, Any], list[str], list[torch.Tensor]]]
    ) -> list[tuple[dict[str, Any], list[str], list[torch.Tensor]]]:
        """The ``(group, keys, params)`` of each update call: one per group here;
        :class:`metaopt.LearnedOptimizer` merges groups that share their hyper-parameters."""
        return plan

    def _step_group(
        self, group: dict[str, Any], keys: list[str], params: list[torch.Tensor]
    ) -> None:
        rule = self.rule_for(group)
        state = {k: self._leaf_state(rule, k, p) for k, p in zip(keys, params, strict=True)}
        update = self._update_for(params)
        if update is not _update_group:
            rule = self._tensor_hyper_rule(group, rule)
        grads = [p.grad for p in params]
        complex_keys = [k for k, p in zip(keys, params, strict=True) if p.is_complex()]
        if complex_keys:  # as torch.optim: complex numbers as pairs of reals
            real_state = dict(state)
            for k in complex_keys:
                real_state[k] = pytree.tree_map_only(torch.Tensor, _as_real, state[k])
            new_state = update(
                rule, keys, [_as_real(p) for p in params], [_as_real(g) for g in grads], real_state
            )
            for k in complex_keys:
                new_state[k] = _as_complex_like(new_state[k], state[k])
        else:
            new_state = update(rule, keys, params, grads, state)
        for k, p in zip(keys, params, strict=True):
            self._store(p, new_state[k])

    def _update_for(self, params: list[torch.Tensor]) -> Callable[..., dict[str, Any]]:
        """The update function for a group of these parameters: eager without
        ``compile=True`` or on the ``meta`` device (shapes only), else a compiled one per
        layout (device type, dtypes and shapes), each with a ``torch.compile`` cache of its
        own. One function shared by all groups compiled a graph per group into one cache
        and, past Dynamo's recompile limit (8 groups of other shapes, e.g. per-layer
        learning rates), ran the remaining groups eagerly; groups of one layout (a head
        per task) still share a function and its graphs."""
        if not self._compile or params[0].device.type == "meta":
            return _update_group
        ids = tuple(map(id, params))  # 2 us for 50 tensors, the layout key 21 us
        update = self._update_of_params.get(ids)
        if update is None:
            key = (params[0].device.type, *((p.dtype, tuple(p.shape)) for p in params))
            update = self._updates.get(key)
            if update is None:
                update = self._updates[key] = compile_own(_update_group)
            # a tensor reshaped in place (p.data = x) keeps its id: its function's own
            # guards then recompile, correct either way
            self._update_of_params[ids] = update
        return update

    def _tensor_hyper_rule(self, group: dict[str, Any], rule: UpdateRule) -> UpdateRule:
        """``rule`` rebuilt with the group's non-zero float hyper-parameters (also inside
        tuples such as ``betas``) as 0-d tensors: graph inputs of the compiled update,
        where a float is a constant that recompiles (or, once Dynamo makes it a dynamic
        float, can be left stale in the graph). ``rule`` itself when nothing is a float or
        the factory does not take the tensors. Kept while :meth:`rule_for` gives the same
        ``rule`` (no new tensors or factory call per step while nothing changes)."""
        if self._factory is None:
            return rule
        names = self._hyper_names
        if self._TENSOR_HYPERS is not None:
            names = names & self._TENSOR_HYPERS
        first = group["params"][0]
        # float64 (a Python float's precision) where the device has it: computed in
        # float32, ``1 - b2`` would be off by 1e-5 (relative) from the eager ``1 - b2``
        dtype = (
            torch.float64
            if first.device.type in ("cpu", "cuda")
            else torch.promote_types(_real_dtype(first.dtype), torch.float32)
        )
        built_for = (rule, dtype, first.device)
        cached = self._tensor_rules.get(id(group))
        if cached is not None and cached[0][0] is rule and cached[0][1:] == built_for[1:]:
            return cached[1]

        def as_tensor(value: Any) -> Any:
            if type(value) is float and value != 0.0:
                return torch.tensor(value, dtype=dtype, device=first.device)
            if type(value) in (tuple, list) and any(type(v) is float and v != 0.0 for v in value):
                return type(value)(as_tensor(v) for v in value)
            return value

        kwargs = {k: group[k] for k in self._hyper_names if k in group}
        tensors = {k: as_tensor(v) if k in names else v for k, v in kwargs.items()}
        tensor_rule = rule
        if any(tensors[k] is not kwargs[k] for k in kwargs):
            try:
                tensor_rule = self._factory(**tensors)
            except Exception:  # a factory that needs numbers keeps them
                pass
        self._tensor_rules[id(group)] = (built_for, tensor_rule)
        return tensor_rule

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; raises ``ValueError`` and changes nothing when it does
        not fit this optimizer (other parameter shapes, another rule, other groups).

        As in ``torch.optim``, the load-state-dict pre-hooks run first (the dict they
        return is the one checked and loaded) and the post-hooks last, once the state is
        fully restored. Each state tensor is the given one, on the parameter's device, in
        the dtype the rule gives it, whatever the state holds it under: ``torch.optim``
        casts every floating state but ``"step"`` to the parameter's dtype, which would
        round metaopt's float32 counters (Adam's ``"[0].step"``) and loss statistics of
        float16 or bfloat16 parameters, or make them infinite. Like ``torch.optim``, the
        loaded state may share memory with the given tensors where nothing had to be
        moved or cast."""
        state_dict = state_dict.copy()  # shallow, as torch.optim (the hooks may edit it)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved = self._validate_state_dict(state_dict)
        pre, post = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        # torch.optim's loader would run the hooks again, and the post-hooks too early
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        self._layouts.clear()
        self._rule_cache.clear()
        self._tensor_rules.clear()  # torch.optim's loader made new group dicts
        self._after_load(saved)
        for post_hook in post.values():
            post_hook(self)

    def _after_load(self, saved: _SavedState) -> None:
        """Replace the state ``torch.optim``'s loader cast by the given tensors, each on
        its parameter's device and in the dtype the rule gives it (as
        :meth:`_validate_state_dict` found them), in the rule's key order."""
        for p, entries in saved.items():
            self.state[p] = {
                k: value.to(device=p.device, dtype=dtype) for k, (dtype, value) in entries.items()
            }

    def _validate_state_dict(self, state_dict: dict[str, Any]) -> _SavedState:
        """Check that ``state_dict`` fits (``ValueError`` otherwise).

        Returns:
            For each parameter with saved state: each of its state tensors as given, with
            the dtype the rule initialises it with, in the rule's key order.
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("not an optimizer state_dict: needs 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        saved_state: _SavedState = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"group {gi}: state_dict has {len(saved['params'])} parameters, "
                    f"the optimizer has {len(group['params'])}"
                )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            self._check_flags(merged)
            rule = self.rule_for(merged)
            self._rule_cache.clear()
            keys = self.param_keys(group)
            for key, pid, p in zip(keys, saved["params"], group["params"], strict=True):
                flat = state_dict["state"].get(pid)
                if not flat:
                    continue
                expected, _ = _flatten_leaf_state(rule.init({key: p})[key])
                got = {k: v for k, v in flat.items()}
                if _describe(expected) != _describe(got):
                    raise ValueError(
                        f"state_dict does not fit parameter {key!r} (group {gi}, shape "
                        f"{tuple(p.shape)}): the rule expects state {_describe(expected)}, "
                        f"the state_dict holds {_describe(got)}"
                    )
                saved_state[p] = {k: (v.dtype, got[k]) for k, v in expected.items()}
        return saved_state
