"""Whether the modules a plan was built from are still as they were, in a few microseconds.

Gathering a layer's weights through ``nn.Module`` attribute lookups (each a Python ``__getattr__``)
and keying them costs more per decode step than the one-call layer's Python side; a ``Watch`` taken
when the plan is built answers "anything changed?" by identity instead: each watched module still
the child its parent holds under that name and still of its class, each of its parameters and
buffers the same object at the same address (a new ``Parameter``, ``.data =``, ``.to()``, a deleted
or added tensor), and each setting read the same object. Anything else: the plan is rebuilt from
scratch (the slow path decides).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import torch
from torch import nn


class Watch:
    """A snapshot of ``children`` (parent, name, child), ``modules`` (their own parameters and
    buffers) and ``settings`` (object, attribute) taken now; ``unchanged()`` compares by identity.
    The comparisons run as ``map`` over tuples (C loops, not Python ones): this is per step."""

    def __init__(
        self,
        children: Iterable[tuple[nn.Module, str, nn.Module]],
        modules: Iterable[nn.Module],
        settings: Iterable[tuple[object, str]],
    ) -> None:
        children, modules, settings = tuple(children), tuple(modules), tuple(settings)
        self.parents = tuple(parent._modules for parent, _, _ in children)
        self.names = tuple(name for _, name, _ in children)
        self.modules = modules
        self.types = tuple(map(type, modules))
        self.dicts = tuple(d for m in modules for d in (m._parameters, m._buffers))
        self.tensors = tuple(t for d in self.dicts for t in d.values() if t is not None)
        self.owners = tuple(obj for obj, _ in settings)
        self.attributes = tuple(name for _, name in settings)
        # held, so their ids stay theirs while compared
        self.held = (tuple(c for _, _, c in children), tuple(t for d in self.dicts for t in d.values()))
        self.held += (tuple(map(getattr, self.owners, self.attributes)),)
        self.ids = self._ids()
        self.pointers = tuple(map(torch.Tensor.data_ptr, self.tensors))

    def _ids(self) -> tuple:
        return (
            tuple(map(id, map(dict.get, self.parents, self.names))),
            tuple(map(id, chain.from_iterable(map(dict.values, self.dicts)))),
            tuple(map(id, map(getattr, self.owners, self.attributes))),
        )

    def unchanged(self) -> bool:
        return (
            tuple(map(type, self.modules)) == self.types
            and self._ids() == self.ids
            and tuple(map(torch.Tensor.data_ptr, self.tensors)) == self.pointers
        )


__all__ = ["Watch"]
