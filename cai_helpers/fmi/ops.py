"""Reduction operations for reduce, allreduce and scan.

The built-in ops ``sum``, ``prod``, ``max`` and ``min`` apply element-wise to Python
ints and floats, numpy scalars and arrays (broadcasting as numpy does), and
recursively to lists, tuples and str-keyed dicts with matching structure. They always
return new objects, so the caller's inputs are never mutated.

A :class:`UserOp` wraps any function of two values. Its ``commutative`` and
``associative`` flags choose the algorithm: unless both are true, every channel
folds strictly in rank order, ``x0 op x1 op ... op x(n-1)``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cai_helpers.errors import InvalidParameterError

BUILTIN_OP_NAMES = ("sum", "prod", "max", "min")


@dataclass(frozen=True)
class UserOp:
    """A reduction function ``fn(left, right) -> value`` with its algebraic flags.

    ``left`` is always the lower ranks' contribution. The flags default to the
    safe choice: an op that is not declared commutative and associative is folded
    in rank order.
    """

    fn: Callable[[Any, Any], Any]
    commutative: bool = False
    associative: bool = False
    name: str = "user"

    def __call__(self, left: Any, right: Any) -> Any:
        return self.fn(left, right)

    @property
    def reorderable(self) -> bool:
        """Whether tree and recursive-doubling algorithms may regroup and reorder operands."""
        return self.commutative and self.associative


_SCALAR_FUNCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add,
    "prod": operator.mul,
    "max": max,
    "min": min,
}
_NUMPY_FUNCTIONS = {
    "sum": np.add,
    "prod": np.multiply,
    "max": np.maximum,
    "min": np.minimum,
}


def _apply_builtin(name: str, left: Any, right: Any) -> Any:
    if isinstance(left, dict) and isinstance(right, dict):
        if left.keys() != right.keys():
            raise InvalidParameterError(
                f"op {name!r} got dicts with different keys {sorted(left)} and "
                f"{sorted(right)}; every peer must contribute the same keys"
            )
        return {key: _apply_builtin(name, left[key], right[key]) for key in left}
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        if len(left) != len(right):
            raise InvalidParameterError(
                f"op {name!r} got sequences of lengths {len(left)} and {len(right)}; "
                "every peer must contribute the same length"
            )
        items = [_apply_builtin(name, a, b) for a, b in zip(left, right)]
        return items if isinstance(left, list) else tuple(items)
    if isinstance(left, (np.ndarray, np.generic)) or isinstance(right, (np.ndarray, np.generic)):
        return _NUMPY_FUNCTIONS[name](left, right)
    numeric = (int, float)
    if isinstance(left, numeric) and isinstance(right, numeric):
        return _SCALAR_FUNCTIONS[name](left, right)
    raise InvalidParameterError(
        f"op {name!r} cannot combine {type(left).__name__} and {type(right).__name__}; "
        "built-in ops take numbers, numpy arrays and dicts or lists of them, so use a "
        "UserOp for other values such as bytes"
    )


def _builtin(name: str) -> UserOp:
    def combine(left: Any, right: Any) -> Any:
        return _apply_builtin(name, left, right)

    return UserOp(combine, commutative=True, associative=True, name=name)


BUILTIN_OPS: dict[str, UserOp] = {name: _builtin(name) for name in BUILTIN_OP_NAMES}


def resolve_op(op: str | UserOp | Callable[[Any, Any], Any]) -> UserOp:
    """Return the :class:`UserOp` for a built-in op name, a UserOp, or a plain function.

    A plain function is treated as neither commutative nor associative.
    """
    if isinstance(op, UserOp):
        return op
    if isinstance(op, str):
        if op not in BUILTIN_OPS:
            raise InvalidParameterError(
                f"unknown reduction op {op!r}; use one of {', '.join(BUILTIN_OP_NAMES)} "
                "or a UserOp"
            )
        return BUILTIN_OPS[op]
    if callable(op):
        return UserOp(op, name=getattr(op, "__name__", "user"))
    raise InvalidParameterError(f"reduction op must be a name, a UserOp or a function, not {op!r}")


def fold_in_rank_order(op: UserOp, values: list[Any]) -> Any:
    """Fold ``values[0] op values[1] op ... op values[-1]`` from the left."""
    result = values[0]
    for value in values[1:]:
        result = op(result, value)
    return result
