"""Binding a call's arguments: which arrays are split, which are shared, what is constant.

Every top-level numpy array argument is split along axis 0 unless it is marked shared (on the
decorator by name, or at the call with `lampy.shared(x)`). Bad arguments fail here, before any
work is sent, with the argument's name in the message.

A reference (`lampy.remote(url)`) is split like an array, but nothing is read here: each chunk
reads its own rows, and a plain call in this process reads it whole. A reference marked shared
is read once here, as every chunk needs all of it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from lampy._errors import SplitLengthError, UnsplittableError
from lampy.runtime._job import Job, Part, SplitArray, Whole, fill, is_row_source, read
from lampy.runtime._plan import Rows
from lampy.runtime._shm import is_shared


class Shared:
    """Marks an argument that every chunk receives whole: `f(x, lampy.shared(window))`."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"lampy.shared({self.value!r})"


def shared(value: Any) -> Shared:
    """Pass `value` whole to every chunk instead of splitting it."""
    return Shared(value)


@dataclass(frozen=True)
class Binding:
    """One call's arguments, sorted for the runtime."""

    args: tuple[Any, ...]  # the arguments with Part/Whole placeholders where arrays were
    kwargs: dict[str, Any]
    split: tuple[SplitArray, ...]
    split_names: tuple[str, ...]
    whole: tuple[np.ndarray, ...]
    constants: tuple[tuple[str, Any], ...]

    @cached_property
    def direct(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The user's values (markers removed) for a plain call here; row sources read whole."""
        return fill(self.args, self.kwargs, [read(a) for a in self.split], self.whole)

    @property
    def direct_args(self) -> tuple[Any, ...]:
        return self.direct[0]

    @property
    def direct_kwargs(self) -> dict[str, Any]:
        return self.direct[1]

    @property
    def rows(self) -> int:
        return self.split[0].shape[0] if self.split else 0

    @property
    def row_bytes(self) -> int:
        return sum(_row_bytes(a) for a in self.split)

    def moved_bytes(self, maps_shared_memory: bool) -> tuple[int, int]:
        """(bytes per row, bytes of whole arrays) an executor moves itself: not the rows of
        references, and, when it `maps_shared_memory`, nothing already in lampy's shared
        memory (the local pool hands such arrays over by descriptor)."""

        def moved(array: Any) -> bool:
            return not (maps_shared_memory and isinstance(array, np.ndarray) and is_shared(array))

        rows = sum(_row_bytes(a) for a in self.split if not is_row_source(a) and moved(a))
        return rows, sum(a.nbytes for a in self.whole if moved(a))

    @property
    def shapes(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        """Shapes and dtypes of the arrays: what an auto plan depends on besides timing."""
        return tuple((a.shape, a.dtype.str) for a in self.split + self.whole)

    @property
    def shared_bytes(self) -> int:
        return sum(a.nbytes for a in self.whole)

    def job(
        self,
        function: Callable[..., Any],
        chunks: tuple[Rows, ...],
        keep_going: bool = False,
        first: int = 0,
        joins_rows: bool = False,
        combine: Callable[[Any, Any], Any] | None = None,
        pace: float | None = None,
        block_rows: int | None = None,
    ) -> Job:
        """A job running `function` over these arguments, cut into `chunks`; `combine` is the
        region's rule, for executors that merge partials where the chunks run; `pace` the
        seconds per row the plan expects of a chunk (`Job.pace`); `block_rows` the rows per
        call within a chunk (`Job.block_rows`)."""
        return Job(
            function,
            self.args,
            self.kwargs,
            self.split,
            self.whole,
            chunks,
            keep_going,
            first,
            combine=combine,
            joins_rows=joins_rows and bool(self.split),
            pace=pace,
            block_rows=block_rows,
        )


def parameter_names(function: Callable[..., Any]) -> set[str] | None:
    """The function's parameter names, or None when it has no inspectable signature."""
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def bind(
    function: Callable[..., Any],
    shared_names: frozenset[str],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Binding:
    """Sort a call's arguments; raises TypeError as the function itself would for a bad call."""
    named = named_arguments(function, args, kwargs)
    split: list[SplitArray] = []
    split_names: list[str] = []
    whole: list[np.ndarray] = []
    constants: list[tuple[str, Any]] = []

    def sort(name: str, value: Any) -> Any:
        """The template value of one argument: itself, or a placeholder for an array."""
        marked = isinstance(value, Shared)
        value = value.value if isinstance(value, Shared) else value
        is_shared = marked or name.partition("[")[0] in shared_names
        if is_row_source(value):
            if not is_shared:
                split.append(value)
                split_names.append(name)
                return Part(len(split) - 1)
            value = value.fetch()
        subclass = isinstance(value, np.ndarray) and type(value) not in (np.ndarray, np.memmap)
        if not isinstance(value, np.ndarray) or (is_shared and value.dtype.hasobject):
            constants.append((name, value))
            return value
        if is_shared and subclass:  # sent whole as it is, in the pickled call: nothing lost
            constants.append((name, value))
            return value
        if subclass:
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            raise UnsplittableError(
                f"argument {name!r} is a {kind}, which lampy cannot split without losing what "
                f"the subclass adds (a mask, matrix rules); pass np.asarray({name}) (and a "
                f"masked array's mask as a second array, or {name}.filled(value)), or "
                f"lampy.shared({name}) to send it whole"
            )
        if is_shared:
            whole.append(value)
            return Whole(len(whole) - 1)
        if value.ndim == 0:
            raise UnsplittableError(
                f"argument {name!r} is a 0-d array, which has no axis 0 to split; pass it as "
                f"a Python scalar, or as lampy.shared({name}) if every chunk needs it"
            )
        if value.dtype.hasobject:
            raise UnsplittableError(
                f"argument {name!r} has object dtype, which cannot be shared between processes; "
                f"convert it to a numeric dtype, or pass lampy.shared({name}) to send it whole"
            )
        split.append(value)
        split_names.append(name)
        return Part(len(split) - 1)

    template = [(name, positional, sort(name, value)) for name, positional, value in named]
    _check_lengths(split, split_names)
    t_args, t_kwargs = _rebuild(template)
    return Binding(
        t_args,
        t_kwargs,
        tuple(split),
        tuple(split_names),
        tuple(whole),
        tuple(constants),
    )


def named_arguments(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> list[tuple[str, bool, Any]]:
    """(name, passed positionally, value) for every argument, in call order."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins and ufuncs without a signature
        named = [(f"args[{i}]", True, v) for i, v in enumerate(args)]
        return named + [(k, False, v) for k, v in kwargs.items()]
    bound = signature.bind(*args, **kwargs)
    positional = len(bound.args)
    named = []
    index = 0
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named += [(f"{name}[{i}]", True, v) for i, v in enumerate(value)]
            index += len(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named += [(k, False, v) for k, v in value.items()]
        else:
            named.append((name, index < positional, value))
            index += 1
    return named


def _rebuild(named: list[tuple[str, bool, Any]]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args = tuple(v for _, positional, v in named if positional)
    kwargs = {name: v for name, positional, v in named if not positional}
    return args, kwargs


def _check_lengths(split: list[SplitArray], names: list[str]) -> None:
    lengths = [a.shape[0] for a in split]
    if len(set(lengths)) > 1:
        described = ", ".join(
            f"{n} has {length} rows" for n, length in zip(names, lengths, strict=True)
        )
        odd = [n for n, length in zip(names, lengths, strict=True) if length != lengths[0]]
        marks = " or ".join(f"lampy.shared({n.partition('[')[0]})" for n in odd[:2])
        keys = ", ".join(repr(n.partition("[")[0]) for n in odd[:2])
        raise SplitLengthError(
            f"split arguments differ in length on axis 0: {described}. Arrays that every chunk "
            f"needs whole must be marked shared: {marks} at the call, or shared=({keys},) on "
            "the decorator"
        )


def _row_bytes(array: SplitArray) -> int:
    return array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
