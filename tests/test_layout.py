"""The project's layout rules, checked from the files themselves.

Each numbered chapter may import only earlier chapters, opens with a docstring that teaches,
tells its story in at most 600 lines with no function over 60, and ends with a `__main__`
self-test; every self-test actually passes when run the way a reader runs it (`python
NN_name.py`, in quick mode where the chapter has one). support/ imports no chapter, and each of
its modules opens by saying it is plumbing and what it guarantees.
"""

import ast
import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CHAPTERS = sorted(REPO_ROOT.glob("[0-9][0-9]_*.py"))
CHAPTER_IDS = [path.name for path in CHAPTERS]


def _number(path: pathlib.Path) -> int:
    return int(path.name[:2])


def _imported_chapters(tree: ast.Module) -> list[str]:
    """Names passed to ``importlib.import_module("NN_...")`` anywhere in the file."""
    names = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return names


def test_there_are_chapters():
    assert CHAPTERS, "no numbered chapter files found at the repository root"


@pytest.mark.parametrize("path", CHAPTERS, ids=CHAPTER_IDS)
def test_chapter_imports_only_earlier_chapters(path):
    tree = ast.parse(path.read_text())
    for name in _imported_chapters(tree):
        assert re.fullmatch(r"\d\d_\w+", name), f"{path.name} imports {name!r}, not a chapter"
        assert (REPO_ROOT / f"{name}.py").exists(), f"{path.name} imports missing {name}.py"
        assert int(name[:2]) < _number(path), f"{path.name} imports {name}, a later chapter"


SUPPORT = sorted((REPO_ROOT / "support").glob("*.py"))


@pytest.mark.parametrize("path", SUPPORT, ids=[p.name for p in SUPPORT])
def test_support_imports_no_chapter(path):
    # support/ is below every chapter: it may import the standard library, the pinned
    # dependencies and itself, never a chapter (by importlib or otherwise).
    tree = ast.parse(path.read_text())
    chapters = _imported_chapters(tree) + [
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        if re.match(r"\d\d_", alias.name)]
    assert not chapters, f"support/{path.name} imports the chapters {chapters}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not re.match(r"\d\d_", node.module), f"support/{path.name} imports {node.module}"


@pytest.mark.parametrize("path", SUPPORT, ids=[p.name for p in SUPPORT])
def test_support_module_states_its_guarantee(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and docstring.startswith("Plumbing") and "uarantee" in docstring, (
        f"support/{path.name} must open with a docstring saying it is plumbing and what it guarantees")


@pytest.mark.parametrize("path", CHAPTERS, ids=CHAPTER_IDS)
def test_chapter_has_teaching_docstring(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring, f"{path.name} has no module docstring"
    lines = [line for line in docstring.splitlines() if line.strip()]
    assert len(lines) >= 5, f"{path.name}'s docstring has {len(lines)} lines; it should teach (5-20)"


@pytest.mark.parametrize("path", CHAPTERS, ids=CHAPTER_IDS)
def test_chapter_tells_its_story_in_600_lines(path):
    # A chapter that outgrows this holds plumbing that belongs in support/ (DESIGN: "a chapter
    # tells its concept's story in about 600 lines at most, no function over about 60").
    source = path.read_text()
    assert len(source.splitlines()) <= 600, f"{path.name} has {len(source.splitlines())} lines"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, f"{path.name}: functions over 60 lines: {long}"


@pytest.mark.parametrize("path", CHAPTERS, ids=CHAPTER_IDS)
def test_chapter_ends_with_self_test(path):
    tree = ast.parse(path.read_text())
    last = tree.body[-1]
    assert isinstance(last, ast.If) and "__name__" in ast.unparse(last.test), (
        f"{path.name} must end with `if __name__ == \"__main__\":`")


@functools.lru_cache(maxsize=None)
def _help(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, path.name, "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", CHAPTERS, ids=CHAPTER_IDS)
def test_help_says_what_it_does(path):
    result = _help(path)
    assert result.returncode == 0 and "usage" in result.stdout.lower(), (
        f"{path.name} --help failed:\n{result.stdout}\n{result.stderr}")


@pytest.mark.parametrize("path", CHAPTERS, ids=CHAPTER_IDS)
def test_self_test_passes(path):
    # Each self-test runs as a reader runs it: a fresh process in the repository root, on CPU,
    # in quick mode where the chapter's --help offers one. It shares the suite's cache
    # (conftest's OPENMOE_CACHE_DIR), so the embedded tokenizer is trained once for everything.
    command = [sys.executable, path.name]
    if "--quick" in _help(path).stdout:
        command.append("--quick")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (
        f"{path.name} self-test failed (exit {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
