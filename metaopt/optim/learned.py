"""``LearnedOptimizer``: the learned continual-learning rule as a ``torch.optim`` drop-in."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from metaopt.learned.checkpoint import load_pretrained
from metaopt.learned.fused import compiled_fused_step, fusable
from metaopt.learned.network import LearnedRuleNet
from metaopt.learned.rule import learned_rule, net_dtype_of, run_on_net_device, wide_dtype
from metaopt.learned.state import LearnedState
from metaopt.learned.tasks import (
    check_importance,
    fold_task,
    learned_leaves,
    map_learned,
    new_task,
    observe_loss,
)
from metaopt.optim.functional import FunctionalOptimizer, _SavedState
from metaopt.rules.base import UpdateRule

logger = logging.getLogger(__name__)

__all__ = ["LearnedOptimizer"]

_STATE_KEYS = tuple(f".{name}" for name in LearnedState._fields)
"""How ``optimizer.state[p]`` names a LearnedState's fields (pytree key paths)."""


class LearnedOptimizer(FunctionalOptimizer):
    """The attention-based learned rule (:func:`metaopt.learned.learned_rule`) as a
    ``torch.optim.Optimizer``, with task boundaries.

    Attention runs across the tensors of all parameter groups that share ``lr``,
    ``betas``, ``eps`` and ``topk_fraction`` (and a device): groups made for bookkeeping,
    such as Hugging Face's weight-decay split, still give the rule one view of the model,
    as in meta-training; groups with other values get an attention of their own. The
    per-parameter state lives in ``optimizer.state[p]`` (Adam's moments, the anchor and
    importance in ``aux_dtype``, per-tensor counters), so ``state_dict()``/``load_state_dict()``, LR
    schedulers, ``torch.amp.GradScaler`` and frameworks that empty ``optimizer.state[p]``
    work as with ``torch.optim.Adam``. When ``step(closure)`` gets a loss from the
    closure, the loss feeds the rule's task token.

    Args:
        params: parameters or parameter groups (named parameters are accepted).
        lr: learning rate (per group; schedulers change it).
        net: the rule's network; ``None`` loads the shipped ``"default"`` checkpoint onto
            the parameters' device (when they share one). A net passed here runs where it
            is: on a GPU, move it there too (``net.to("cuda")``), or every step sends the
            tokens to the net's device and the coefficients back.
        betas: Adam's moment decay rates (per group).
        eps: Adam's denominator constant (per group).
        topk_fraction: hard selection of the fraction of tokens that move (per group).
        max_block: target elements per token (see :func:`metaopt.learned.learned_rule`).
        sample_size: elements sampled per token for its statistics.
        aux_dtype: dtype of the anchor and importance buffers (``None``: the parameter's).
        importance: the task-boundary importance score, one of
            :data:`metaopt.learned.IMPORTANCE_KINDS`.
        factored: Adafactor-style second moments for matrices (about 1x Adam's state
            instead of 1.5x; see :func:`~metaopt.learned.learned_rule`).
        reuse_buffers: keep two scratch buffers per parameter between steps (the
            ``workspace`` of :func:`~metaopt.learned.learned_rule`): faster eager steps
            for 2 x the parameters' bytes of resident memory (not optimizer state; not
            saved). ``False`` allocates them at every step instead.
        check_finite: see :class:`metaopt.FunctionalOptimizer`.
        compile: run each group's update as one ``torch.compile``'d in-place pass per
            tensor (:func:`metaopt.learned.fused.fused_learned_step_`: parameters and moments
            read and written once, as ``torch.optim.Adam(fused=True)`` does); groups with
            non-contiguous parameters or moments use the compiled functional update of
            :class:`metaopt.FunctionalOptimizer` instead. On a CPU it is compiled with
            Inductor's C++ wrapper (:data:`metaopt.learned.fused.CPU_FUSED_OPTIONS`). The
            first step compiles, the first step after the first task boundary once more
            (importance terms switch on): on a 2-core CPU with cold caches about half a
            minute each for an 8-tensor MLP and about two minutes each for a 49-tensor
            transformer (the graph grows with the number of tensors); Inductor's on-disk
            cache brings that down to seconds in later processes. The learning
            rate, ``betas`` and ``eps`` are graph inputs, so schedulers (``OneCycleLR``
            cycles ``betas``) do not recompile. Parameters on the ``meta`` device are
            updated eagerly.
        weight_decay: accepted as 0 only (``torch.optim.Adam``'s argument, so that code
            passing ``weight_decay=0`` runs unchanged); anything else raises
            ``ValueError``, in a parameter group too: the rule learned its own decay.
        process_group: the ``torch.distributed`` group whose processes train one model
            together (``DistributedDataParallel``'s, e.g. ``dist.group.WORLD``): the loss
            a closure returns is averaged over it before it reaches the rule's task
            token, so that every process's rule sees the same loss statistics and the
            replicas stay identical (each feeding its own loss, they drift apart). Every
            process of the group must then call ``step(closure)`` together. ``None``:
            this process's loss (a warning when a closure's loss is fed while
            ``torch.distributed`` runs more than one process). Not copied.

    Parameters on the ``meta`` device are stepped as by ``torch.optim.Adam`` (shapes and
    dtypes only; the net then runs on the ``meta`` device too). Copies (``copy.deepcopy``,
    ``pickle``) carry the net, the options and the task index and step like the
    original; step hooks, scratch buffers and compiled steps are not copied.

    Example:
        >>> opt = LearnedOptimizer.from_pretrained("default", model.parameters(), lr=1e-3)
        >>> for task in stream:
        ...     train(model, opt, task)
        ...     opt.new_task()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        net: LearnedRuleNet | None = None,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        topk_fraction: float | None = None,
        max_block: int = 65536,
        sample_size: int = 32,
        aux_dtype: torch.dtype | None = torch.bfloat16,
        importance: str = "path",
        factored: bool = False,
        reuse_buffers: bool = True,
        check_finite: bool = True,
        compile: bool = False,
        weight_decay: float = 0.0,
        process_group: Any = None,
    ) -> None:
        _check_no_weight_decay(weight_decay)
        self._process_group = process_group
        if net is not None and not isinstance(net, LearnedRuleNet):
            raise TypeError(f"net must be a LearnedRuleNet, got {type(net).__name__}")
        check_importance(importance)
        self.net = net if net is not None else load_pretrained("default")
        self._options: dict[str, Any] = {
            "max_block": max_block,
            "sample_size": sample_size,
            "aux_dtype": aux_dtype,
            "importance": importance,
            "factored": factored,
        }
        learned_rule(  # validates the options now, before any parameter is touched
            self.net, lr, betas=betas, eps=eps, topk_fraction=topk_fraction, **self._options
        )
        self._eager_fast_paths = not compile
        self._reuse_buffers = reuse_buffers
        self._task_index = 0
        loaded_here = net is None
        super().__init__(
            params,
            self._rule_factory(),
            check_finite=check_finite,
            compile=compile,
            lr=lr,
            betas=betas,
            eps=eps,
            topk_fraction=topk_fraction,
        )
        if loaded_here:
            self._move_net_to_params()

    def _move_net_to_params(self) -> None:
        """Puts a net this optimizer loaded itself on its parameters' device, when they
        share one, so that the rule's attention runs there (not on the CPU, with the
        tokens and coefficients copied both ways at every step)."""
        device = _one_device([p for group in self.param_groups for p in group["params"]])
        if device is not None and device.type != "meta":
            self.net.to(device)

    _TENSOR_HYPERS = frozenset({"lr"})  # the rule needs betas, eps, topk_fraction as numbers

    _PICKLED = (
        *(name for name in FunctionalOptimizer._PICKLED if name != "_factory"),
        "net",
        "_options",
        "_eager_fast_paths",
        "_reuse_buffers",
        "_task_index",
    )

    def _reset_transient(self) -> None:
        super()._reset_transient()
        # one compiled step per device type and group layout (see _fused_step_for)
        self._fused_steps: dict[tuple[Any, ...], Callable[..., list[LearnedState]]] | None = (
            {} if self._compile else None
        )
        self._view_caches: dict[int, dict[str, Any]] = {}  # per group, for the fused step
        self._step_input_cache: dict[int, tuple[Any, tuple[torch.Tensor, ...]]] = {}
        self._workspace: dict[Any, list[torch.Tensor]] | None = (
            {} if self._reuse_buffers and not self._compile else None
        )
        self._loss: torch.Tensor | None = None
        self._warned_local_loss = False
        self._depth: dict[torch.Tensor, float] = {}  # set by _params_changed

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._factory = self._rule_factory()  # a closure over this optimizer
        self._process_group = None  # process groups are not copied

    @classmethod
    def from_pretrained(
        cls, name: str, params: Iterable[Any], lr: float = 1e-3, **options: Any
    ) -> LearnedOptimizer:
        """An optimizer running a shipped checkpoint (see
        :func:`metaopt.learned.load_pretrained`; ``name`` may also be a ``.pt`` path),
        with its net on the parameters' device when they share one."""
        optimizer = cls(params, lr=lr, net=load_pretrained(name), **options)
        optimizer._move_net_to_params()
        return optimizer

    @property
    def task_index(self) -> int:
        """Task boundaries marked so far (0 during the first task)."""
        return self._task_index

    # ------------------------------------------------------------------ rule
    def _rule_factory(self) -> Callable[..., UpdateRule]:
        def learned(
            lr: float | torch.Tensor = 1e-3,
            betas: tuple[float, float] = (0.9, 0.999),
            eps: float = 1e-8,
            topk_fraction: float | None = None,
        ) -> UpdateRule:
            return learned_rule(
                self.net,
                lr,
                betas=tuple(betas),
                eps=eps,
                topk_fraction=topk_fraction,
                depth=self._depth_of,
                inplace_state=self._eager_fast_paths,
                workspace=self._workspace,
                importance_free=self._task_index == 0,
                **self._options,
            )

        return learned

    def _depth_of(self, key: str, p: torch.Tensor) -> float:
        return self._depth.get(p, 0.5)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``.

        Raises:
            ValueError: the group asks for a non-zero ``weight_decay`` (Hugging Face-style
                groups do), which the rule has no way to apply: it learned its own decay
                towards zero. The group is not added.
            TypeError: a parameter is not floating point (complex); the group is not added.
        """
        if isinstance(param_group, dict):
            _check_no_weight_decay(param_group.get("weight_decay", 0.0))
        super().add_param_group(param_group)
        added = self.param_groups[-1]["params"]
        unsupported = [p.dtype for p in added if not p.is_floating_point()]
        if unsupported:
            self.param_groups.pop()
            raise TypeError(
                f"LearnedOptimizer updates floating-point parameters only, got "
                f"{unsupported[0]} (complex parameters: use FunctionalOptimizer with a rule "
                "such as metaopt.rules.adam, which steps them as torch.optim does)"
            )

    def _params_changed(self, params: list[torch.Tensor]) -> None:
        """Each parameter's depth: its position among all groups' parameters, in [0, 1]
        (recomputed whenever the groups' parameter lists change, so that a parameter
        whose state starts later, e.g. a new head, sits where it is now); the fused
        steps' cached views of parameters no longer optimised are dropped."""
        n = len(params)
        self._depth = {p: i / (n - 1) if n > 1 else 0.5 for i, p in enumerate(params)}
        self._view_caches.clear()

    def rule_for(self, group: dict[str, Any]) -> UpdateRule:
        """The group's rule; during ``step(closure)`` it first records the closure's loss."""
        return self._observing_loss(super().rule_for(group))

    def _observing_loss(self, rule: UpdateRule) -> UpdateRule:
        """``rule`` that first records the closure's loss (during ``step(closure)``)."""
        loss = self._loss
        if loss is None:
            return rule
        return UpdateRule(rule.init, lambda g, s, p=None: rule.update(g, observe_loss(s, loss), p))

    def _tensor_hyper_rule(self, group: dict[str, Any], rule: UpdateRule) -> UpdateRule:
        """As :class:`FunctionalOptimizer`'s (``lr`` only), rebuilt from the factory, so
        the closure's loss is recorded again."""
        tensor_rule = super()._tensor_hyper_rule(group, rule)
        return rule if tensor_rule is rule else self._observing_loss(tensor_rule)

    def _leaf_state(self, rule: UpdateRule, key: str, p: torch.Tensor) -> Any:
        flat = self.state[p]
        if flat and tuple(flat) == _STATE_KEYS:  # fast path: no pytree round trip
            return LearnedState(*flat.values())
        fresh = not flat
        leaf = super()._leaf_state(rule, key, p)
        if fresh and self._task_index:
            index = float(self._task_index)
            leaf = map_learned(
                {key: leaf},
                lambda k, s: s._replace(task_index=torch.full_like(s.task_index, index)),
            )[key]
        return leaf

    def _store(self, p: torch.Tensor, leaf_state: Any) -> None:
        if type(leaf_state) is LearnedState:  # fast path, same layout as the pytree one
            self.state[p] = dict(zip(_STATE_KEYS, leaf_state, strict=True))
            return
        super()._store(p, leaf_state)

    # ------------------------------------------------------------------ step and tasks
    def _update_calls(
        self, plan: list[tuple[dict[str, Any], list[str], list[torch.Tensor]]]
    ) -> list[tuple[dict[str, Any], list[str], list[torch.Tensor]]]:
        """One update call, hence one attention, per set of groups whose rule
        hyper-parameters (``lr``, ``betas``, ``eps``, ``topk_fraction``) are equal and
        whose parameters are on one device, in the order of each set's first group.

        The rule is meta-trained with every tensor of a model in one attention; groups
        made for bookkeeping (Hugging Face's weight-decay / no-decay split, one group per
        task head) would otherwise each see a part of the model. Keys that collide across
        the merged groups (positions, when no names were given) get the group's index as a
        prefix (``"1.0"``)."""
        if len(plan) < 2:
            return plan
        # per call: its first group, the device of its parameters (None: several), and
        # each merged group's index and keys, and all their parameters
        calls: list[
            tuple[dict[str, Any], torch.device | None, list[tuple[int, list[str]]], list[Any]]
        ] = []
        position = {id(g): i for i, g in enumerate(self.param_groups)}
        for group, keys, params in plan:
            device = _one_device(params)
            for first, call_device, key_lists, merged in calls:
                if device is not None and device == call_device and all(
                    _same_hyper(first.get(name), group.get(name)) for name in self._hyper_names
                ):
                    key_lists.append((position[id(group)], keys))
                    merged.extend(params)
                    break
            else:
                calls.append((group, device, [(position[id(group)], keys)], list(params)))
        return [(group, _merged_keys(key_lists), params) for group, _, key_lists, params in calls]

    def _step_group(
        self, group: dict[str, Any], keys: list[str], params: list[torch.Tensor]
    ) -> None:
        """The fused in-place step (``compile=True``) where it applies, else the
        functional one of :class:`metaopt.FunctionalOptimizer`."""
        if self._fused_steps is None or params[0].device.type == "meta":
            super()._step_group(group, keys, params)
            return
        rule = super().rule_for(group)  # only initialises missing state here
        stored = [self._leaf_state(rule, k, p) for k, p in zip(keys, params, strict=True)]
        leaves = stored
        if self._loss is not None:
            named = observe_loss(dict(zip(keys, leaves, strict=True)), self._loss)
            leaves = [named[k] for k in keys]
        folded = [bool(s.pending.numel()) for s in leaves]
        leaves = [
            fold_task(s, p, self._options["importance"]) if pending else s
            for s, p, pending in zip(leaves, params, folded, strict=True)
        ]
        if not fusable(params, leaves):  # e.g. a non-contiguous (channels_last) parameter
            super()._step_group(group, keys, params)
            return
        wide = wide_dtype(params)
        device = params[0].device
        lr, b1, b2, eps = self._step_inputs(group, wide, device)
        new_leaves = self._fused_step_for(params)(
            [p.grad for p in params],
            params,
            leaves,
            lambda tokens, task: run_on_net_device(self.net, None, tokens, task),
            lr=lr,
            b1=b1,
            b2=b2,
            eps=eps,
            max_block=self._options["max_block"],
            sample_size=self._options["sample_size"],
            topk_fraction=group["topk_fraction"],
            net_dtype=net_dtype_of(self.net, None),
            importance_free=self._task_index == 0 and not any(folded),
            view_cache=self._view_caches.setdefault(id(group), {}),
        )
        for p, before, leaf in zip(params, stored, new_leaves, strict=True):
            if leaf is not before:  # else the state holds these tensors, updated in place
                self._store(p, leaf)

    def _fused_step_for(self, params: list[torch.Tensor]) -> Callable[..., list[LearnedState]]:
        """The compiled fused step for a group of these parameters: one per device type
        and layout (the number of tensors, their dtypes and ranks).

        Dynamo compiles a function at most ``recompile_limit`` (8) times and, under
        ``fullgraph=True``, raises at the next recompilation. Every layout needs graphs
        of its own, several each (the first task, after a boundary, sizes made dynamic),
        so one step shared by all groups raised ``FailOnRecompileLimitHit`` mid-training
        once the groups' layouts together needed more graphs than that. Groups of one
        layout (e.g. a new head per task) still share one step and its graphs."""
        assert self._fused_steps is not None
        device_type = params[0].device.type
        key = (device_type, *((p.dtype, p.ndim) for p in params))
        fused_step = self._fused_steps.get(key)
        if fused_step is None:
            fused_step = self._fused_steps[key] = compiled_fused_step(device_type)
        return fused_step

    def _step_inputs(
        self, group: dict[str, Any], wide: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """The group's ``lr`` (in ``wide``), ``betas`` and ``eps`` as 0-d tensors on the
        parameters' device for the fused step: inputs of its graph, so a scheduler that
        changes them (``OneCycleLR`` cycles ``betas``) does not recompile. Kept while the
        values do not change: no new tensors, and no copy from the host, per step (a
        CUDA graph can then capture the step).

        ``betas`` and ``eps`` in float64 where the device has it: ``1 - b2`` of a float32
        ``b2`` is off by 1e-5 (relative) from the eager rule's ``1 - b2`` in Python floats."""
        adam_dtype = torch.float64 if device.type in ("cpu", "cuda") else wide
        values = (group["lr"], *group["betas"], group["eps"])
        key = (values, wide, device)
        if not all(isinstance(v, (int, float)) for v in values):
            key = None  # tensors: compared by value only at a cost
        cached = self._step_input_cache.get(id(group))
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        dtypes = (wide, adam_dtype, adam_dtype, adam_dtype)
        tensors = tuple(
            torch.as_tensor(v, dtype=d, device=device) for v, d in zip(values, dtypes, strict=True)
        )
        if key is not None:
            self._step_input_cache[id(group)] = (key, tensors)
        return tensors

    def _closure_loss(self, loss: Any) -> None:
        """A closure's scalar tensor loss feeds the task token (averaged over
        :attr:`process_group`) during the step it belongs to."""
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._loss = self._shared_loss(loss.detach())
        else:
            self._loss = None

    def _shared_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` averaged over :attr:`process_group` (``loss`` itself without one)."""
        if self._process_group is None:
            if (
                not self._warned_local_loss
                and dist.is_available()
                and dist.is_initialized()
                and dist.get_world_size() > 1
            ):
                logger.warning(
                    "LearnedOptimizer.step(closure) under torch.distributed feeds this "
                    "process's own loss to the rule: replicas of one model drift apart. "
                    "Pass process_group= (e.g. dist.group.WORLD) to average it."
                )
                self._warned_local_loss = True
            return loss
        total = loss.reshape(()).clone()
        dist.all_reduce(total, group=self._process_group)  # SUM: gloo has no AVG
        return total / dist.get_world_size(self._process_group)

    @torch.no_grad()
    def new_task(self) -> None:
        """Mark a task boundary: for every parameter with state, snapshot the anchor to its
        current value, fold the finished task's importance into the accumulated
        importance, reset the in-task counters and increment the task index (also kept
        as each group's ``"task_index"``, so that a ``state_dict()`` saved before any
        parameter has state still holds it)."""
        self._sync_params()
        for group in self.param_groups:
            rule = self.rule_for(group)
            for key, p in zip(self.param_keys(group), group["params"], strict=True):
                if not self.state.get(p):
                    continue
                leaf = self._leaf_state(rule, key, p)
                leaf = new_task({key: leaf}, {key: p}, importance=self._options["importance"])
                self._store(p, leaf[key])
        self._task_index += 1
        for group in self.param_groups:
            group["task_index"] = self._task_index
        self._rule_cache.clear()  # rules built while importance was zero skip it

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim``; keeps the auxiliary buffers in ``aux_dtype`` and the counters
        in float32 (``torch.optim`` would cast every floating state to the parameter's
        dtype) and restores the task index, all before the load-state-dict post-hooks
        run."""
        super().load_state_dict(state_dict)

    def _after_load(self, saved: _SavedState) -> None:
        super()._after_load(saved)
        self._sync_params()
        task_index = float(max(g.get("task_index", 0) for g in self.param_groups))
        for group in self.param_groups:
            rule = self.rule_for(group)
            for key, p in zip(self.param_keys(group), group["params"], strict=True):
                if not self.state.get(p):
                    continue
                leaf = self._leaf_state(rule, key, p)
                found = [
                    float(s.task_index)
                    for s in learned_leaves(leaf)
                    if s.task_index.device.type != "meta"  # no value to read
                ]
                task_index = max([task_index, *found])
        self._task_index = int(task_index)
        self._rule_cache.clear()


def _check_no_weight_decay(weight_decay: Any) -> None:
    """``ValueError`` for a non-zero ``weight_decay`` (accepted as 0 so that code written
    for ``torch.optim.Adam`` that passes ``weight_decay=0`` runs unchanged)."""
    if weight_decay:
        raise ValueError(
            f"LearnedOptimizer has no weight_decay (asked for {weight_decay}): the learned "
            "rule decays weights as it learned to; drop the argument or set it to 0, or use "
            "FunctionalOptimizer(params, metaopt.rules.adamw) for AdamW"
        )


def _one_device(params: list[torch.Tensor]) -> torch.device | None:
    """The parameters' device, ``None`` when they are on several."""
    devices = {p.device for p in params}
    return devices.pop() if len(devices) == 1 else None


def _same_hyper(a: Any, b: Any) -> bool:
    """Equal hyper-parameter values: numbers (and tuples of them) by value, tensors (a
    tensor learning rate) only when they are the same tensor."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_hyper(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _merged_keys(key_lists: list[tuple[int, list[str]]]) -> list[str]:
    """The keys of merged groups, as given when they are unique, else each prefixed by its
    group's index."""
    keys = [k for _, group_keys in key_lists for k in group_keys]
    if len(set(keys)) == len(keys):
        return keys
    return [f"{index}.{k}" for index, group_keys in key_lists for k in group_keys]
