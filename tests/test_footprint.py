"""Blocks, not a framework: every block module imports alone (design.md, "Layout and the block boundary").

Checked, each import in a fresh interpreter (one forked child per module, after ``import torch``):
- importing a block loads at most 3 other vembed_blocks modules (package ``__init__``s do not count);
- it loads none of PIL, transformers, diffusers, pyarrow, matplotlib unless `ALLOWED_HEAVY` lists it;
- ``from vembed_blocks import GradCache, InfoNCE`` loads neither PIL nor transformers;
- every name in ``vembed_blocks.__all__`` (and ``vembed_blocks.data.__all__``) resolves;
- no module outside ``vembed_blocks/demo/`` imports ``vembed_blocks.demo`` (also lazily, in a function);
- the edit wing's package imports nothing, and without diffusers its pipeline loader names the extra.

Blocks are found by walking the package folder: every module except package ``__init__``s,
``vembed_blocks.demo.*`` and ``vembed_blocks.recipe_flags`` (the recipes' shared flags, not a block).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from _watchdog import run_watched

PACKAGE = "vembed_blocks"
ROOT = Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])
HEAVY = ("PIL", "transformers", "diffusers", "pyarrow", "matplotlib")
MAX_OTHERS = 3
# module -> heavy libraries it may load at import. Empty on purpose: each block imports a heavy
# library inside the function that needs it. A block that cannot is listed here with the reason.
ALLOWED_HEAVY: dict[str, set[str]] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def block_modules() -> list[str]:
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        if path.name == "__init__.py" or name.startswith(f"{PACKAGE}.demo.") or name == f"{PACKAGE}.recipe_flags":
            continue
        names.append(name)
    return names


BLOCKS = block_modules()

# Imports each module named in argv in a forked child of an interpreter that has only torch loaded,
# and prints {module: {"others": [...], "heavy": [...]} or {"error": ...}} as JSON.
PROBE = r"""
import importlib, json, os, sys
import torch  # what every block needs; loaded once, before the forks

HEAVY = %r
result = {}
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            mods = sys.modules
            others = [m for m in mods if m.startswith("vembed_blocks.") and m != name]
            others = [m for m in others if not hasattr(mods[m], "__path__")]  # packages do not count
            res = {"others": sorted(others), "heavy": [h for h in HEAVY if h in mods]}
        except BaseException as e:
            res = {"error": "%%s: %%s" %% (type(e).__name__, e)}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(res))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result[name] = json.loads(f.read() or '{"error": "the child died"}')
    os.waitpid(pid, 0)
print(json.dumps(result))
""" % (HEAVY,)


def _python(code: str, *args: str) -> str:
    out = run_watched(  # a hang fails, a slow machine does not
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT.parent
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def footprints() -> dict[str, dict]:
    if not hasattr(os, "fork"):
        pytest.skip("the probe forks one child per module")
    return json.loads(_python(PROBE, *BLOCKS).splitlines()[-1])


def test_blocks_are_discovered():
    # The walk must find the blocks the design names, and skip what is not a block.
    for name in ("losses", "gradcache", "gradcache_budget", "data.records", "data.shards", "edit.records"):
        assert f"{PACKAGE}.{name}" in BLOCKS
    assert not any(b.startswith(f"{PACKAGE}.demo") or b.endswith(("__init__", "recipe_flags")) for b in BLOCKS)


@pytest.mark.parametrize("module", BLOCKS)
def test_block_imports_alone(footprints, module):
    got = footprints[module]
    assert "error" not in got, f"importing {module} failed: {got.get('error')}"
    assert len(got["others"]) <= MAX_OTHERS, f"{module} loads {len(got['others'])} other modules: {got['others']}"
    extra = set(got["heavy"]) - ALLOWED_HEAVY.get(module, set())
    assert not extra, f"{module} loads {sorted(extra)} at import; import it inside the function that uses it"


def test_top_level_names_load_neither_pil_nor_transformers():
    code = "import json, sys\nfrom vembed_blocks import GradCache, InfoNCE\n"
    code += f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))"
    assert json.loads(_python(code).splitlines()[-1]) == []


@pytest.mark.parametrize("package", [PACKAGE, f"{PACKAGE}.data"])
def test_all_names_resolve(package):
    mod = importlib.import_module(package)
    missing = []
    for name in mod.__all__:
        try:
            getattr(mod, name)
        except (AttributeError, ImportError) as e:
            missing.append(f"{name}: {e}")
    assert not missing and len(mod.__all__) == len(set(mod.__all__)), missing


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names of every module an ``import`` statement of ``tree`` names (relative ones resolved)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names += [target] + [f"{target}.{a.name}" for a in node.names]
    return names


def test_no_block_imports_demo():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        if name == f"{PACKAGE}.demo" or name.startswith(f"{PACKAGE}.demo."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        demo = f"{PACKAGE}.demo"
        bad = [n for n in _imported(tree, name, path.name == "__init__.py") if n == demo or n.startswith(demo + ".")]
        offenders += [f"{name}: {b}" for b in bad]
    assert not offenders, offenders


def test_demo_import_scan_sees_relative_and_lazy_imports():
    # The scan above must catch the forms a block could use, or it could never fail.
    code = "def f():\n    from .demo import shapes\n    from ..demo.text import x\nimport vembed_blocks.demo.vlm\n"
    tree = ast.parse(code)
    assert {f"{PACKAGE}.demo.shapes", f"{PACKAGE}.demo.vlm"} <= set(_imported(tree, f"{PACKAGE}.losses", False))
    assert f"{PACKAGE}.demo.text.x" in _imported(tree, f"{PACKAGE}.data.records", False)


def test_edit_package_imports_nothing_and_names_its_extra_without_diffusers():
    code = (
        "import json, sys\n"
        "sys.modules['diffusers'] = None  # as if the extra were not installed: importing it fails\n"
        "import vembed_blocks.edit\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('vembed_blocks.') and m != 'vembed_blocks.edit')\n"
        "from vembed_blocks.edit.prompts import load_prompt_pipeline\n"
        "try:\n"
        "    load_prompt_pipeline('no-such-folder')\n"
        "    error = None\n"
        "except ImportError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps([loaded, error]))\n"
    )
    loaded, error = json.loads(_python(code).splitlines()[-1])
    assert loaded == []
    assert error is not None and "vembed-blocks[edit]" in error, error
