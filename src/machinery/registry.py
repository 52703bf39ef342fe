"""Registered tasks: argument conversion driven by type hints, what each task declares, its context."""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .controls import TaskOptions
from .errors import ArgumentError
from .signature import Signature
from .types import Arg, convert_value

ProgressReport = Callable[[float, str], None]


@dataclass(slots=True)
class TaskContext:
    """Given to a task whose first parameter is annotated ``TaskContext`` (Go's context.Context):
    its signature (UUID, retry count, headers), and a way to report progress."""

    signature: Signature
    report: ProgressReport | None = field(default=None, repr=False, compare=False)

    @property
    def task_uuid(self) -> str:
        return self.signature.uuid

    @property
    def retry_count(self) -> int:
        return self.signature.retry_count

    def progress(self, fraction: float, message: str = "") -> None:
        """Say how far the task is (0.0 to 1.0) and what it is doing; readable from any process
        with ``AsyncResult.progress()``. Cheap: the latest report is written in the background."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
            raise ValueError(f"progress must be a number from 0 to 1, got {fraction!r}")
        if self.report is not None:
            self.report(min(1.0, max(0.0, float(fraction))), str(message))


Converter = Callable[[Any], Any]


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def converter_for(hint: Any) -> Converter | None:
    """A function that checks and converts a Go-decoded value to ``hint``; None accepts anything."""
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return converter_for(options[0]) if len(options) == 1 else None
    if hint is bool:
        return _expect(lambda v: isinstance(v, bool), lambda v: v)
    if hint is int:
        return _expect(lambda v: isinstance(v, int) and not isinstance(v, bool), lambda v: v)
    if hint is float:
        return _expect(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float)
    if hint is str:
        return _expect(lambda v: isinstance(v, str), lambda v: v)
    if hint in (bytes, bytearray):
        return _expect(lambda v: isinstance(v, (bytes, bytearray)), bytes)
    if origin in (list, Sequence, typing.Sequence, tuple) or hint in (list, tuple):
        element_args = typing.get_args(hint)
        element = converter_for(element_args[0]) if element_args else None
        container = tuple if origin is tuple or hint is tuple else list

        def convert_list(value: Any) -> Any:
            if isinstance(value, (bytes, bytearray)):
                value = list(value)
            if not isinstance(value, list):
                raise TypeError
            return container(value if element is None else [element(v) for v in value])

        return convert_list
    return None


def _expect(check: Callable[[Any], bool], cast: Callable[[Any], Any]) -> Converter:
    def convert(value: Any) -> Any:
        if not check(value):
            raise TypeError
        return cast(value)

    return convert


class TaskSpec:
    """A registered function with what is needed to call it from a Signature's Args."""

    def __init__(self, name: str, fn: Callable[..., Any], options: TaskOptions | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"task {name!r} must be callable, got {fn!r}")
        self.name = name
        self.fn = fn
        self.options = options or TaskOptions()
        # A callable object is async if its __call__ is.
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
        params = list(inspect.signature(fn).parameters.values())
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable forward references: skip checks, never refuse the task
            hints = {}
        self.wants_context = bool(params) and hints.get(params[0].name) is TaskContext
        if self.wants_context:
            params = params[1:]
        self._positional: list[tuple[str, Converter | None, bool]] = []
        self._variadic: tuple[str, Converter | None] | None = None
        for p in params:
            hint = hints.get(p.name, inspect.Parameter.empty)
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                self._positional.append((p.name, converter_for(hint), p.default is p.empty))
            elif p.kind is p.VAR_POSITIONAL:
                self._variadic = (p.name, converter_for(hint))
            elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
                raise TypeError(
                    f"task {name!r} has a required keyword-only parameter {p.name!r}; "
                    "task messages carry positional arguments only"
                )
        self._hints = hints

    def convert_args(self, args: Sequence[Arg] | None) -> list[Any]:
        """Convert wire Args to call values, raising ``ArgumentError`` that names the argument."""
        args = args or ()
        required = sum(1 for _, _, req in self._positional if req)
        if len(args) < required or (self._variadic is None and len(args) > len(self._positional)):
            raise ArgumentError(f"{self.name} takes {self._arity()}, got {len(args)}")
        values = []
        for i, arg in enumerate(args):
            try:
                value = convert_value(arg.type, arg.value)
            except ArgumentError as exc:
                raise ArgumentError(f"Reflect task args error: argument {i}: {exc}") from None
            if i < len(self._positional):
                pname, convert, _ = self._positional[i]
            else:
                assert self._variadic is not None
                pname, convert = self._variadic
                pname = f"*{pname}"
            if convert is not None:
                try:
                    value = convert(value)
                except (TypeError, ValueError):
                    hint = self._hints.get(pname.lstrip("*"))
                    raise ArgumentError(
                        f"argument {i} of {self.name} (parameter {pname!r}) is declared "
                        f"{_describe(hint)} but got {arg.type} value {arg.value!r}"
                    ) from None
            values.append(value)
        return values

    def _arity(self) -> str:
        """``1 argument``, ``2 arguments``, ``1 to 3 arguments``, ``at least 1 argument``."""
        required = sum(1 for _, _, req in self._positional if req)
        most = len(self._positional)
        if self._variadic is not None:
            count = f"at least {required}" if required else "any number of"
            return f"{count} argument{'s' if required != 1 else ''}"
        if required == most:
            return f"{required} argument{'s' if required != 1 else ''}"
        return f"{required} to {most} arguments"
