"""The documentation stays true to the repository: every docs/ page cited anywhere exists, links resolve,
the pages' file paths, test names and `tbg.` names exist, and nothing cites a source outside the
repository (the repository explains itself: README, docs/, docstrings)."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# The repository's text files: sources, scripts, build files and documentation.
TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".sh", ".toml", ".in", ".txt"}
TOP_FILES = ("README.md", "Makefile", "CMakeLists.txt", "pyproject.toml", ".ci/run")
SOURCE_DIRS = ("tbg", "csrc", "tests", "bench", "tools", "docs", "cmake")
# Spelled in pieces so that this file does not cite them itself.
OUTSIDE_SOURCES = ("../" + "shared", "shared/" + "reference", "tbg-" + "model.md")

DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w.-]+\.md")
REPO_PATH = re.compile(r"(?<![\w/.-])(?:tbg|csrc|tests|bench|tools|docs|cmake|\.ci)/[\w./-]*\w")
TEST_NAME = re.compile(r"(tests/\w+\.py)::(\w+)")
DOTTED_NAME = re.compile(r"(?<![\w.])tbg(?:\.[A-Za-z_]\w*)+")
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def repository_files() -> list[Path]:
    files = [ROOT / name for name in TOP_FILES if (ROOT / name).is_file()]
    for folder in SOURCE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and "__pycache__" not in p.parts]
    return sorted(files)


def test_the_pages_exist() -> None:
    assert {p.name for p in DOCS} >= {"model.md", "architecture.md", "gpu.md"}


def test_docs_paths_cited_anywhere_exist() -> None:
    files = repository_files()
    assert ROOT / "tbg" / "nn" / "reference.py" in files and ROOT / "README.md" in files
    cited = {(path.relative_to(ROOT).as_posix(), match) for path in files
             for match in DOCS_PATH.findall(path.read_text(errors="replace"))}
    assert any(match == "docs/model.md" for _, match in cited)  # the pattern finds citations at all
    missing = sorted(f"{where}: {match}" for where, match in cited if not (ROOT / match).is_file())
    assert not missing, "cited docs pages that do not exist: " + "; ".join(missing)


def test_nothing_cites_sources_outside_the_repository() -> None:
    found = sorted(f"{path.relative_to(ROOT)}: {text}" for path in repository_files()
                   for text in OUTSIDE_SOURCES if text in path.read_text(errors="replace"))
    assert not found, "the repository must explain itself; cited from outside it: " + "; ".join(found)


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    links = [link for link in MARKDOWN_LINK.findall(page.read_text()) if "://" not in link]
    missing = [link for link in links if not (page.parent / link).exists()]
    assert not missing, f"{page.name}: broken links {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_paths_and_test_names_in_the_pages_exist(page: Path) -> None:
    text = page.read_text()
    missing = sorted({path for path in REPO_PATH.findall(text) if not (ROOT / path).exists()})
    assert not missing, f"{page.name} cites files that do not exist: {missing}"
    for path, name in TEST_NAME.findall(text):
        tree = ast.parse((ROOT / path).read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"{page.name} cites {path}::{name}, which does not exist"


def _resolve(dotted: str) -> object:
    """The object a dotted name such as tbg.nn.spec.EDGE_EPS or tbg.chem.EnergyModel.kT names."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_tbg_names_in_the_pages_resolve(page: Path) -> None:
    names = sorted(set(DOTTED_NAME.findall(page.read_text())))
    broken = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as err:
            broken.append(f"{name} ({type(err).__name__}: {err})")
    assert not broken, f"{page.name} names what does not exist: {broken}"
