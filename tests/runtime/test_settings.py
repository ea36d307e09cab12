"""Defaults: decorator over `using` over the environment over built-ins."""

from __future__ import annotations

import asyncio

import pytest

import lampy
from lampy.runtime._settings import resolve_chunks, resolve_executor, resolve_options


def test_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_executor(None) == "local" and resolve_chunks(None) == "auto"
    monkeypatch.setenv("LAMPY_EXECUTOR", "inline")
    monkeypatch.setenv("LAMPY_CHUNKS", "5")
    assert resolve_executor(None) == "inline" and resolve_chunks(None) == 5
    with lampy.using(executor="local", chunks=3):
        assert resolve_executor(None) == "local" and resolve_chunks(None) == 3
        assert resolve_executor("inline") == "inline" and resolve_chunks(7) == 7
        with lampy.using(chunks="auto"):
            assert resolve_executor(None) == "local" and resolve_chunks(None) == "auto"
    assert resolve_executor(None) == "inline"


def test_executor_options_from_env_and_using(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMPY_LOCAL_WORKERS", "4")
    assert resolve_options("local") == {"workers": "4"}
    with lampy.using(executor="local", workers=2):
        assert resolve_options("local") == {"workers": 2}
        with lampy.using(chunks=2):
            assert resolve_options("local") == {"workers": 2}
    assert resolve_options("inline") == {}


def test_using_is_per_task() -> None:
    async def inside(name: str) -> str:
        with lampy.using(executor=name):
            await asyncio.sleep(0.01)
            return resolve_executor(None)

    async def main() -> list[str]:
        return list(await asyncio.gather(inside("inline"), inside("local")))

    assert asyncio.run(main()) == ["inline", "local"]


def test_boolean_options_from_env_strings() -> None:
    from lampy._errors import OptionError
    from lampy.runtime.executors._base import Executor

    class Toggle(Executor):
        name = "toggle"
        option_types = {"progress": bool}

    assert Toggle.parse_options({"progress": "False"}) == {"progress": False}
    assert Toggle.parse_options({"progress": "on"}) == {"progress": True}
    with pytest.raises(OptionError, match="must be bool; got 'maybe'"):
        Toggle.parse_options({"progress": "maybe"})
