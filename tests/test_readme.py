"""The README and the docs say what is true: the README's quickstart runs as written, the README stays short, every
relative link and anchor resolves, every repository path the docs name exists, and every flag of every documented
command is one the command accepts."""

from __future__ import annotations

import ast
import configparser
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The newcomer-facing documents (docs/study/ is a generated report and is left out).
DOCUMENTS = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md")),
             REPO / "examples" / "recipes" / "README.md", REPO / "benchmarks" / "RESULTS.md"]  # fmt: skip
MAX_README_LINES = 250

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# A file of the repository (with an extension) or a folder (with a trailing slash); output folders such as
# `benchmarks/gpu_out` are neither.
REPO_PATH = re.compile(r"^(?:diverse_vit_hf|tests|examples|benchmarks|docs)/(?:[\w.-]+/)*(?:[\w-]+\.\w+)?$")


def fenced_blocks(text: str, language: str | None = None) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if language is None or lang == language]


def prose(text: str) -> str:
    """The text outside fenced code blocks (links and paths inside code blocks are examples, not references)."""
    return FENCE.sub("", text)


def quickstart() -> str:
    blocks = fenced_blocks(README.read_text(), "python")
    assert blocks, "README.md has no ```python block"
    return blocks[0]


# ---- The quickstart ------------------------------------------------------------------------------------------------


def test_quickstart_imports_only_the_top_level_package():
    """Submodule paths move; the names in `diverse_vit_hf.__all__` are the public API the README may use."""
    import diverse_vit_hf

    for node in ast.walk(ast.parse(quickstart())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diverse_vit_hf":
            assert node.module == "diverse_vit_hf", f"the quickstart imports from {node.module}"
            assert {alias.name for alias in node.names} <= set(diverse_vit_hf.__all__)
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] != "diverse_vit_hf" for alias in node.names)


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    # One thread: the suite shares a small CPU with other jobs, where two threads per process oversubscribe it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", quickstart()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    terms = re.search(r"^loss terms: (\{.*\})$", run.stdout, re.MULTILINE)
    assert terms, run.stdout
    terms = ast.literal_eval(terms.group(1))
    assert set(terms) == {"loss_cls", "loss_patch_cosine", "loss_patch_contrastive", "loss_attention_cosine",
                          "loss_weight_condition"}  # fmt: skip
    assert all(math.isfinite(value) and value >= 0 for value in terms.values()), terms
    top1 = re.search(r"^held-out top-1: (\d\.\d{3})$", run.stdout, re.MULTILINE)
    assert top1, run.stdout
    assert 0.3 < float(top1.group(1)) <= 1.0  # 10 classes: well above chance after 60 steps

    # "a plain ViTForImageClassification checkpoint": what vanilla transformers loads.
    saved = tmp_path / "quickstart"
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    assert (saved / "model.safetensors").is_file()


# ---- Size, links and paths -----------------------------------------------------------------------------------------


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {MAX_README_LINES})"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in prose(path.read_text()).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(document):
    assert document.is_file(), f"{document.relative_to(REPO)} is missing"
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.relative_to(REPO)}")
    assert not broken, f"{document.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_in_the_docs_exist(document):
    """A path written as code (`diverse_vit_hf/models/modeling.py`, `tests/test_families.py::test_x`) must exist:
    modules move, and the docs must move with them."""
    missing = []
    for span in INLINE_CODE.findall(prose(document.read_text())):
        candidate = span.split("::")[0].rstrip(".,:;")
        if REPO_PATH.match(candidate) and "<" not in candidate and not (REPO / candidate).exists():
            missing.append(candidate)
    assert not missing, f"{document.relative_to(REPO)} names paths that do not exist: {sorted(set(missing))}"


def test_no_tracker_numbers_in_the_docs():
    """The docs describe the product, not the history of its tickets."""
    for document in DOCUMENTS:
        found = re.findall(r"\bissues? #?\d+", document.read_text(), flags=re.IGNORECASE)
        assert not found, f"{document.relative_to(REPO)}: {found}"


# ---- Documented commands -------------------------------------------------------------------------------------------


def documented_commands() -> list[list[str]]:
    """Every shell command in the documents' ```bash blocks (continuations joined) and inline code spans."""
    commands = []
    for document in DOCUMENTS:
        text = document.read_text()
        lines = [line for block in fenced_blocks(text, "bash") for line in block.replace("\\\n", " ").splitlines()]
        lines += INLINE_CODE.findall(prose(text))
        for line in lines:
            try:
                commands.append(shlex.split(line, comments=True))
            except ValueError:  # an unbalanced quote in a prose code span: not a command
                continue
    return commands


def console_script() -> str:
    """`module:function` of the `diverse-vit` command, as setup.cfg declares it."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        if name.strip() == "diverse-vit":
            return target.strip()
    raise AssertionError("setup.cfg declares no diverse-vit console script")


# Runs each program's --help in one interpreter (runpy for the scripts, the console entry point for `diverse-vit`), so
# torch and transformers are imported once instead of once per program; prints {program: [exit code, help text]}.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
programs, entry_module, entry_function = json.loads(sys.argv[1])
results = {}
for program in programs:
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out):
            if program[0] == "diverse-vit":
                sys.argv = ["diverse-vit", *program[1:], "--help"]
                getattr(__import__(entry_module, fromlist=[entry_function]), entry_function)()
            else:
                sys.argv = [program[0], "--help"]
                runpy.run_path(program[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code or 0
    results[" ".join(program)] = [code, out.getvalue()]
sys.stdout.write(json.dumps(results))
"""


def accepted_flags(programs: set[tuple[str, ...]]) -> dict[tuple[str, ...], frozenset[str]]:
    """The flags each program's `--help` lists."""
    module, _, function = console_script().partition(":")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    payload = json.dumps([sorted(programs), module, function])
    run = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, payload], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, f"the --help runner failed: {run.stderr[-2000:]}"
    results = json.loads(run.stdout)
    accepted = {}
    for program in programs:
        code, text = results[" ".join(program)]
        assert code == 0, f"{' '.join(program)} --help exited {code}"
        accepted[program] = frozenset(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text))
    return accepted


def program_and_flags(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """The documented program (a script of examples/ or benchmarks/, or a `diverse-vit` subcommand) and the flags
    passed to it; None for any other command."""

    def flags(arguments: list[str]) -> list[str]:
        return [word.split("=")[0] for word in arguments if word.startswith("--")]

    for index, word in enumerate(words):
        if re.fullmatch(r"(examples|benchmarks)/\w+\.py", word):
            return (word,), flags(words[index + 1 :])
        if word == "diverse-vit" and index + 1 < len(words):
            return ("diverse-vit", words[index + 1]), flags(words[index + 2 :])
    return None


@pytest.mark.slow
def test_every_documented_flag_exists():
    commands = [found for words in documented_commands() if (found := program_and_flags(words)) is not None]
    missing = {
        program[0] for program, _ in commands if program[0] != "diverse-vit" and not (REPO / program[0]).is_file()
    }
    assert not missing, f"documented commands run scripts that do not exist: {sorted(missing)}"
    programs = {program for program, flags in commands if flags}
    accepted = accepted_flags(programs)
    unknown = {
        f"{' '.join(program)} {flag}" for program, flags in commands for flag in flags if flag not in accepted[program]
    }
    assert not unknown, f"documented commands use flags their programs do not accept: {sorted(unknown)}"
