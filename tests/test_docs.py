"""The README and docs say what the code does: every recipe command they show parses with that recipe's
flags, every run folder they name is one a command writes, the README's snippets run against the demo
exports, and the figures it quotes are the ones the bare demo runs measure (so a renamed flag or folder,
or a changed figure, fails here rather than on a user's first try).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
from _recipes import load_script
from _watchdog import run_watched

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
# Pages a user reads: the README, docs/, and each recipe's docstring (its --help)
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md")), *(ROOT / "recipes" / f"{n}.py" for n in RECIPES)]
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:[A-Z_]+=\S+ )*(?:python|torchrun) [^`\n]*recipes/\w+\.py[^`\n]*)`")


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def recipe_parser(name: str) -> argparse.ArgumentParser:
    """The parser ``recipes/<name>.py``'s ``parse_args`` builds (caught at its first parse, nothing run)."""
    module = load_script(name)
    original = argparse.ArgumentParser.parse_known_args

    def catch(self, *args, **kwargs):
        raise _Parser(self)

    argparse.ArgumentParser.parse_known_args = catch
    try:
        module.parse_args([])
    except _Parser as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{name}.parse_args never parsed")


def page_text(path: Path) -> str:
    """A markdown page, or a recipe's docstring (its commands are indented lines: one fenced block)."""
    text = path.read_text()
    return text if path.suffix == ".md" else "```\n" + ast.get_docstring(ast.parse(text)) + "\n```"


def shell_lines(text: str) -> list[str]:
    """Commands from fenced shell blocks (continuations joined, comments cut) and inline `...` spans."""
    out = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            out.append(line.split(" #")[0])
    return out + INLINE.findall(text)


def recipe_commands(path: Path) -> list[tuple[str, list[str], str]]:
    """``(recipe, argv, the command)`` for each recipe invocation the page shows in full (``...`` = elided)."""
    found = []
    for line in shell_lines(page_text(path)):
        m = re.search(r"^\s*(?:[A-Z_]+=\S+ )*(?:python|torchrun)\b.*?recipes/(\w+)\.py(.*)", line)
        if not m or m.group(1) not in RECIPES or "..." in line or "--help" in line:
            continue
        found.append((m.group(1), shlex.split(m.group(2).split("&&")[0]), line.strip()))
    return found


def test_every_recipe_command_in_the_docs_parses_with_that_recipes_flags():
    parsers = {name: recipe_parser(name) for name in RECIPES}
    checked, bad = 0, []
    for page in DOCS:
        for name, argv, line in recipe_commands(page):
            p = parsers[name]
            # The base parse: flags and values (choices, types); files need not exist for a documented command.
            with contextlib.redirect_stderr(open(os.devnull, "w")):
                try:
                    _, extra = argparse.ArgumentParser.parse_known_args(p, argv)
                except SystemExit:
                    extra = ["(argparse refused a value)"]
            if extra:
                bad.append(f"{page.relative_to(ROOT)}: `{line}`: {extra}")
            checked += 1
    assert not bad, "\n".join(bad)
    assert checked >= 40, checked  # the pages show many commands; a broken extractor would find none


def default_outputs() -> set[str]:
    return {recipe_parser(name).get_default("output") for name in RECIPES}


def test_run_folders_the_docs_name_are_written_by_a_command():
    """``runs/<name>/...`` in a page is a recipe's default --output or an --output the same page gives."""
    defaults, bad = default_outputs(), []
    for page in DOCS:
        text = page_text(page)
        given = set(re.findall(r"--output\s+(runs/[\w.-]+)", text)) | defaults
        for folder in set(re.findall(r"(?<![\w/])(runs/[\w.-]+)", text)):
            if folder not in given:
                bad.append(f"{page.relative_to(ROOT)}: {folder} (no command writes it; defaults: {sorted(defaults)})")
    assert not bad, "\n".join(bad)


def readme_table() -> dict[str, list[str]]:
    """README's recipe table: ``{recipe: [cells]}``."""
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| \[`(\w+)`\]\(docs/recipes/\w+\.md\) \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_readme_recipe_table_lists_every_recipe_with_its_line_count():
    table = readme_table()
    assert sorted(table) == RECIPES
    for name, cells in table.items():
        lines = len((ROOT / "recipes" / f"{name}.py").read_text().splitlines())
        assert cells[-1] == str(lines), f"README says recipes/{name}.py has {cells[-1]} lines; it has {lines}"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_every_python_snippet_in_the_docs_compiles_and_imports_what_exists():
    """Each ```python block of README and docs/ is valid Python, and its imports resolve (a renamed block or
    function fails here); the README's encode snippet also runs, below."""
    checked = 0
    for page in (p for p in DOCS if p.suffix == ".md"):
        for block in python_blocks(page):
            compile(block, str(page), "exec")
            imports = "\n".join(line for line in block.splitlines() if line.startswith(("from ", "import ")))
            exec(compile(imports, str(page), "exec"), {})
            checked += 1
    assert checked >= 20, checked


# ----------------------------------------------------------------------------- the bare runs and their figures


DECIMAL = re.compile(r"(?<![@\w.])(\d+\.\d+)")


def quoted(cell: str) -> list[str]:
    """The decimal figures of a README cell in order, as written (``recall@5`` is a name, not a figure)."""
    return DECIMAL.findall(cell)


def metric_pairs(metrics: dict, *names: str) -> list[float]:
    return [v for n in names for v in (metrics["before"][n], metrics["after"][n])]


@pytest.fixture(scope="module")
def bare_runs(tmp_path_factory) -> Path:
    """Every recipe run exactly as the README shows it (``python recipes/X.py``) in a fresh folder."""
    cwd = tmp_path_factory.mktemp("bare")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell: torch's default
    for name in RECIPES:
        start = time.perf_counter()
        done = run_watched([sys.executable, str(ROOT / "recipes" / f"{name}.py")], cwd=cwd, env=env, timeout=300)
        assert done.returncode == 0, f"python recipes/{name}.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        (cwd / f"{name}.log").write_text(done.stdout + done.stderr)
        print(f"python recipes/{name}.py: {time.perf_counter() - start:.1f} s wall", file=sys.stderr)
    return cwd


def measured(cwd: Path, name: str) -> tuple[list[float], float]:
    """The figures the README's cell for ``name`` quotes, read from the run's files (and the room each has
    beyond rounding: none; the README quotes plain ``python`` on 2 cores, as CI runs it)."""
    out = cwd / "runs" / name
    if name == "evaluate":
        m = json.loads((cwd / "runs" / "eval" / "metrics.json").read_text())
        return [m["after"]["recall@5"]], 0.0
    if name == "extract_embeds":
        return [float(sum(1 for f in out.glob("index-*.jsonl") for _ in f.open()))], 0.0
    m = json.loads((out / "metrics.json").read_text())
    if name in ("clip_t2i", "qwen3_fsdp"):
        return metric_pairs(m, "recall@5"), 0.0
    if name in ("text_t2t", "distill", "colbert"):
        return metric_pairs(m, "recall@1"), 0.0
    if name == "multitask":
        return metric_pairs(m, "edit/recall@5", "pairs/recall@5"), 0.0
    if name == "edit_sft":
        return metric_pairs(m, "flow_loss"), 0.0
    raise KeyError(name)


def assert_quoted(where: str, got: list[str], want: list[float], room: float) -> None:
    """Each figure as written (``0.800``: 3 decimals) equals the measured one rounded, give or take ``room``."""
    assert len(got) == len(want), f"{where} quotes {got}; the run gives {want}"
    for q, m in zip(got, want):
        decimals = len(q.split(".")[1]) if "." in q else 0
        allowed = (0.5 * 10**-decimals if decimals else 0) + room + 1e-9
        assert math.isclose(float(q), m, abs_tol=allowed), f"{where} quotes {q}; the bare run measured {m:.4f}"


@pytest.mark.parametrize("name", RECIPES)
def test_readme_figures_are_what_the_bare_runs_measure(bare_runs, name):
    cell = readme_table()[name][1]
    want, room = measured(bare_runs, name)
    got = re.findall(r"(\d+) rows", cell) if name == "extract_embeds" else quoted(cell)
    assert_quoted(f"README's {name} row ({cell!r})", got, want, room)


def test_readme_setup_figure_is_the_main_jobs(bare_runs):
    setup = README.read_text().split("## Set-up")[1].split("## ")[0]
    got = list(re.search(r"recall@5\s+#?\s*(\d\.\d+) -> (\d\.\d+)", setup, re.S).groups())
    want, room = measured(bare_runs, "clip_t2i")
    assert_quoted("README's set-up", got, want, room)


def test_readme_encode_snippet_runs_on_the_demo_exports(bare_runs, monkeypatch):
    """The README's "Encode and compare" snippet as written, its image path pointed at a demo image."""
    (snippet,) = [b for b in python_blocks(README) if "load_encoder(" in b]
    image = sorted((bare_runs / "runs" / "clip_t2i" / "demo" / "img").glob("*.png"))[0]
    monkeypatch.chdir(bare_runs)
    scope: dict = {}
    exec(compile(snippet.replace("img/a.png", str(image)), str(README), "exec"), scope)
    assert scope["scores"].shape == (1, 1)
    assert len(scope["vectors"]) == 1


def test_two_task_demo_table_is_what_its_bare_run_measures(tmp_path):
    """docs/recipes/qwen3_fsdp.md's two-task table: ``python recipes/qwen3_fsdp.py --demo-tasks`` as written,
    each before -> after figure against the run's metrics.json (per task, and the colour task at width 32)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell: torch's default
    cmd = [sys.executable, str(ROOT / "recipes" / "qwen3_fsdp.py"), "--demo-tasks"]
    done = run_watched(cmd, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    metrics = json.loads((tmp_path / "runs" / "qwen3_fsdp" / "metrics.json").read_text())
    page = (ROOT / "docs" / "recipes" / "qwen3_fsdp.md").read_text().split("<!-- two-task demo table -->")[1]
    rows = {line.split("|")[1].strip(): line.split("|")[3:-1] for line in page.splitlines() if line.startswith("| ")}
    columns = {"retrieval": ["recall@1", "recall@5"], "colour": ["recall@1", "recall@5", "dim32/recall@1"]}
    for task, names in columns.items():
        got = [q for cell in rows[task] for q in quoted(cell)]
        assert_quoted(
            f"the two-task table's {task} row", got, metric_pairs(metrics, *(f"{task}/{n}" for n in names)), 0
        )
