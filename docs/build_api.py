"""Build the API reference (`make docs`) from what `lampy` and `lampy.testing` export.

The pages cover exactly the public names: `lampy.__all__` and `lampy.testing.__all__` as they
are when the build runs (for a module without `__all__`, its non-underscore functions, classes
and constants defined in it). Every other lampy module is internal and left out. A public class
or function without a docstring stops the build, so the reference never has an empty entry.

    python docs/build_api.py [OUTPUT_DIR]     # default build/docs; needs the docs extra (pdoc)
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pdoc
import pdoc.doc
import pdoc.render

PUBLIC_MODULES = ("lampy", "lampy.testing")


def public_names(module: ModuleType) -> list[str]:
    """The names a module exports: its `__all__`, else what it defines without an underscore."""
    declared = getattr(module, "__all__", None)
    if declared is not None:
        return list(declared)
    return [
        member.name
        for member in pdoc.doc.Module(module).members.values()
        if not member.name.startswith("_") and member.taken_from[0] == module.__name__
    ]


def undocumented(module: ModuleType) -> list[str]:
    """Public classes and functions of `module` whose docstring is empty (data is exempt)."""
    model = pdoc.doc.Module(module)
    missing = []
    for name in public_names(module):
        member = model.get(name)
        if member is None:
            missing.append(f"{module.__name__}.{name} (listed but not found)")
        elif (
            isinstance(member, pdoc.doc.Class | pdoc.doc.Function) and not member.docstring.strip()
        ):
            missing.append(f"{module.__name__}.{name}")
    return missing


def internal_modules() -> list[str]:
    """Every lampy module that is not public: excluded from the pages."""
    package = importlib.import_module("lampy")
    found = pkgutil.walk_packages(package.__path__, prefix="lampy.")
    return sorted(info.name for info in found if info.name not in PUBLIC_MODULES)


def build(output: Path) -> list[str]:
    """Write the HTML reference into `output`; returns the undocumented names (then no pages)."""
    modules = [importlib.import_module(name) for name in PUBLIC_MODULES]
    missing = [name for module in modules for name in undocumented(module)]
    if missing:
        return missing
    # pdoc cannot resolve the annotations of the __init__ that NamedTuple generates (lampy.Partial)
    # and says so for each; the page is right all the same.
    warnings.filterwarnings("ignore", "Error parsing type annotation", UserWarning)
    pdoc.render.configure(docformat="markdown", footer_text="lampy API reference")
    specs = [*PUBLIC_MODULES, *(f"!{name}" for name in internal_modules())]
    pdoc.pdoc(*specs, output_directory=output)
    return []


def main(argv: list[str]) -> int:
    output = Path(argv[0] if argv else "build/docs")
    missing = build(output)
    if missing:
        print(f"docs: no docstring for {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"docs: wrote {output / 'index.html'} ({', '.join(PUBLIC_MODULES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
