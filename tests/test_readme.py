"""Every code block in README.md and docs/ holds: Python snippets run as written (each in a fresh
interpreter), TOML parses, and every ``balancer`` command in a shell block names a real subcommand and
real options of it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

from balancer.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.name, language, body)
    for page in PAGES
    for language, body in re.findall(r"```(\w*)\n(.*?)```", page.read_text(), flags=re.DOTALL)
]
SNIPPETS = [(f"{page}-{i}", body) for i, (page, language, body) in enumerate(BLOCKS) if language == "python"]
SHELL = [
    (f"{page}-{i}", body) for i, (page, language, body) in enumerate(BLOCKS) if language in ("bash", "sh")
]


def test_the_documentation_has_snippets() -> None:
    assert len(SNIPPETS) >= 5
    assert any(name.startswith("README.md") for name, _ in SNIPPETS)


@pytest.mark.parametrize("snippet", [s for _, s in SNIPPETS], ids=[name for name, _ in SNIPPETS])
def test_snippet_runs(snippet: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, f"{snippet}\n---\n{done.stdout}\n{done.stderr}"
    # a routine run (a ring formed, used and left gracefully) logs no warning: with logging not set
    # up, Python would print one as a bare line on stderr
    assert not done.stderr, f"{snippet}\n---\n{done.stderr}"


@pytest.mark.parametrize(
    "text", [body for _, language, body in BLOCKS if language == "toml"], ids=lambda text: text.split("\n")[0]
)
def test_toml_blocks_parse(text: str) -> None:
    assert tomllib.loads(text)


def balancer_commands(script: str) -> list[list[str]]:
    """The ``balancer ...`` commands of a shell block, as argument lists (comments, ``&``, ``&&`` and
    line continuations removed; ``$NAME`` expanded where the block assigns ``NAME="..."``)."""
    text = script.replace("\\\n", " ")
    names = dict(re.findall(r'^(\w+)="([^"]*)"$', text, flags=re.MULTILINE))
    text = re.sub(r"\$(\w+)", lambda m: names.get(m.group(1), m.group(0)), text)
    commands = []
    for line in text.splitlines():
        for part in re.split(r"&&|;|&|\|\|", line):
            words = shlex.split(part, comments=True)
            if words and words[0].endswith("balancer") and words[0].split("/")[-1] == "balancer":
                commands.append(words[1:])
    return commands


def test_shell_blocks_name_balancer_commands() -> None:
    found = [command for _, script in SHELL for command in balancer_commands(script)]
    assert len(found) >= 8
    assert ["plugins"] in found


@pytest.mark.parametrize("script", [s for _, s in SHELL], ids=[name for name, _ in SHELL])
def test_shell_blocks_use_real_subcommands_and_options(script: str) -> None:
    assert isinstance(main, click.Group)
    for words in balancer_commands(script):
        command = main.commands.get(words[0])
        assert command is not None, f"balancer {words[0]}: no such subcommand"
        known = {option for param in command.params for option in (*param.opts, *param.secondary_opts)}
        for word in words[1:]:
            flag = word.split("=")[0]
            assert not flag.startswith("-") or flag in known, f"balancer {words[0]} has no option {flag}"


def test_the_architecture_page_names_every_module() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.relative_to(ROOT) for p in (ROOT / "balancer").rglob("*.py"))
    named = {
        m: (f"`{m.parent}/`",) if m.name == "__init__.py" else (f"`{m}`", f"`{m.name}`") for m in modules
    }
    missing = [str(m) for m, names in named.items() if not any(name in page for name in names)]
    assert not missing, f"docs/architecture.md does not say where these live: {missing}"
