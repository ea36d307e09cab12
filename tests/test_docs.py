"""The documentation stays true: the API reference builds and every public name has a
docstring, the README keeps its order and length, its quickstart prints what it shows, links
resolve, install lines name the real distribution, and only public names are shown."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import lampy
import lampy.testing

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Pages other issues write; their links are checked once they exist.
WRITTEN_ELSEWHERE = {ROOT / "ARCHITECTURE.md", ROOT / "docs" / "evaluation.md"}
# Public names the runtime redesign adds (lampy.upload replaces an internal upload function,
# lampy.declare the lazy one); the pages already use them. Drop each once lampy exports it.
SECTIONS = [
    "Install",
    "The two commands",
    "Quickstart",
    "The hints",
    "Executors and configuration",
    "OpenLambda",
    "Where to go next",
    "Benchmarks",
    "Glossary",
]


def build_api() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_builds_and_covers_every_public_name(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "build_api.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "lampy.html").read_text()
    for name in lampy.__all__:
        assert f'id="{name}"' in page, name
    testing = (tmp_path / "lampy" / "testing.html").read_text()
    for name in build_api().public_names(lampy.testing):
        assert f'id="{name}"' in testing, name
    assert not list(tmp_path.glob("lampy/runtime*")), "internal modules are not documented"


def test_a_public_name_without_a_docstring_stops_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "halfdone.py").write_text(
        '"""A module."""\n\n__all__ = ["told", "bare", "Quiet", "LIMIT"]\nLIMIT = 3\n\n\n'
        'def told():\n    """Documented."""\n\n\ndef bare():\n    pass\n\n\n'
        "class Quiet:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("halfdone")
    assert build_api().undocumented(module) == ["halfdone.bare", "halfdone.Quiet"]


def test_every_public_name_has_a_docstring() -> None:
    api = build_api()
    assert api.undocumented(lampy) == []
    assert api.undocumented(lampy.testing) == []


def test_the_readme_is_a_short_guide_in_order() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 400
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == SECTIONS


def test_the_quickstart_prints_what_the_readme_shows(tmp_path: Path) -> None:
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", quickstart, flags=re.DOTALL)
    shown = re.search(r"```text\n(.*?)```", quickstart, flags=re.DOTALL)
    assert code is not None and shown is not None
    (tmp_path / "quickstart.py").write_text(code.group(1))
    done = subprocess.run(
        [sys.executable, "quickstart.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown.group(1)


def test_install_lines_name_the_distribution_and_it_holds_only_lampy() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^name = "(.+)"$', pyproject, re.MULTILINE)
    name = declared.group(1) if declared else None
    assert name == "lampy-numpy"
    # The wheel holds lampy alone: the Fisher example is no top-level package of it.
    assert 'include = ["lampy", "lampy.*"]' in pyproject
    for page in PAGES:
        for line in re.findall(r"pip install [^\n`]*", page.read_text()):
            target = line.split()[2].strip("'\"")
            assert target.startswith((".", name)), f"{page.name}: {line}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if file in WRITTEN_ELSEWHERE and not file.exists():
                continue
            assert file.exists(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)
                assert anchor in {_slug(h) for h in headings}, f"{page.name}: {target}"


def test_pages_show_only_public_names() -> None:
    testing = set(build_api().public_names(lampy.testing))
    public = set(lampy.__all__) | {"testing"}
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"lampy[./](runtime|regions|lazy|errors|cli)\b", text), page.name
        for name, member in re.findall(r"(?<![\w/.-])lampy\.(\w+)(?:\.(\w+))?", text):
            if name == "tar":  # lampy.tar.gz, the deploy tarball
                continue
            assert name in public, f"{page.name}: lampy.{name}"
            if name == "testing" and member:
                assert member in testing, f"{page.name}: lampy.testing.{member}"
