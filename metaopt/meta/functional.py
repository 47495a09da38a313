"""Pure views of an ``nn.Module`` for inner loops: parameters and buffers as explicit trees.

Meta-gradient estimators differentiate through a sequence of inner updates, so the model
must be a pure function of its parameters. :class:`PureModel` wraps a module with
:func:`torch.func.functional_call` and returns the *new* buffers of each call, so modules
whose forward pass mutates buffers (batch-norm running statistics in train mode) stay pure:
the caller's buffer tensors are never written to. Frozen parameters
(``requires_grad=False``) travel with the buffers: constants of the inner loop, which no
update rule trains (as ``torch.optim`` never updates them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from metaopt.tree import Params

__all__ = ["PureModel", "detach_tree", "pure_call"]


def detach_tree(tree: Any) -> Any:
    """Every tensor leaf of ``tree`` detached (no graph kept); other leaves unchanged."""
    return torch.utils._pytree.tree_map(
        lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree
    )


class PureModel:
    """A module as a pure function ``(params, buffers, *args) -> (output, new_buffers)``.

    Args:
        module: any ``nn.Module``. Its own parameters and buffers are only read to build
            the initial trees; :meth:`__call__` never modifies them.

    Attributes:
        parameter_names: the names of ``module``'s parameters (frozen ones included).

    Example:
        >>> pure = PureModel(model)
        >>> params, buffers = pure.init()
        >>> logits, buffers = pure(params, buffers, x)
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"PureModel expects an nn.Module, got {type(module).__name__}")
        self.module = module
        self.parameter_names = frozenset(k for k, _ in module.named_parameters())

    def init(self, dtype: torch.dtype | None = None) -> tuple[Params, Params]:
        """Detached copies of the module's parameters and buffers.

        Args:
            dtype: cast floating-point tensors to this dtype (e.g. ``torch.float64``).

        Returns:
            ``(params, buffers)``: ``dict[name, Tensor]`` each. ``params`` holds the
            parameters that require grad (they require grad in the copy too); frozen
            parameters (``requires_grad=False``) are returned in ``buffers``, so the
            inner loop never updates them.
        """

        def copy(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().clone()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        named = list(self.module.named_parameters())
        params = {k: copy(p).requires_grad_(True) for k, p in named if p.requires_grad}
        frozen = {k: copy(p) for k, p in named if not p.requires_grad}
        buffers = {k: copy(b) for k, b in self.module.named_buffers()}
        return params, {**frozen, **buffers}

    def __call__(self, params: Params, buffers: Params, *args: Any, **kwargs: Any):
        """Run the module with ``params`` and ``buffers``; returns ``(output, new_buffers)``.

        Buffers are cloned before the call, so in-place updates made by the forward pass
        (batch-norm running mean/var and ``num_batches_tracked``) land in the returned
        ``new_buffers`` and not in ``buffers``. The module's train/eval mode decides
        whether batch-norm uses batch statistics, as with an ordinary call. Frozen
        parameters among ``buffers`` are passed through as they are (not cloned).
        """
        frozen = {k: v for k, v in buffers.items() if k in self.parameter_names}
        if not frozen:
            return pure_call(self.module, params, buffers, *args, **kwargs)
        own = {k: v for k, v in buffers.items() if k not in frozen}
        out, new_buffers = pure_call(self.module, {**params, **frozen}, own, *args, **kwargs)
        return out, {**frozen, **new_buffers}


def pure_call(module: nn.Module, params: Params, buffers: Params, *args: Any, **kwargs: Any):
    """``module`` run with ``params`` and ``buffers`` (:func:`torch.func.functional_call`
    on clones of the buffers); returns ``(output, new_buffers)``, ``buffers`` untouched.
    What :class:`PureModel` calls; traceable by ``torch.compile`` with ``module`` as an
    argument. Buffers the forward reassigns (``self.count = self.count + 1``) are
    returned with their new values, like those it updates in place."""
    # one dict: functional_call writes the reassigned buffers back into the dict it is
    # given, so they must be read from that dict, not from the clones put into it
    tensors = {**params, **{k: b.clone() for k, b in buffers.items()}}
    out = functional_call(module, tensors, args, kwargs, strict=True)
    return out, {k: tensors[k] for k in buffers}
