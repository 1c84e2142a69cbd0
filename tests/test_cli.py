"""The command line (--help) and sail.py's layout budget."""

import ast

import pytest
import torch

import plumbing
import sail
from conftest import HERE


def test_help_shows_dashed_flags_switches_groups_and_the_defaults_of_the_world_that_would_run(
        capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: the tiny world
    with pytest.raises(SystemExit) as exit_info:
        sail.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    usage = out[:out.index("\n\n")]
    assert "--seed-pairs" in usage and "--seed_pairs" not in out
    assert "[--tiny]" in usage and "TINY" not in usage  # a switch, not --tiny [TINY]
    assert "Defaults shown: the tiny world" in " ".join(out.split())
    text = " ".join(out.split())
    assert "image size in pixels (SD 1.5: 512) (default: 16)" in text  # the tiny preset's value
    sections = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert sections[-len(plumbing.GROUPS):] == [f"{title}:" for title in plumbing.GROUPS.values()]  # as Args


def test_sail_py_keeps_its_layout_budget():
    """sail.py's header states it: at most 1,000 lines, the algorithm (PART 1, up to the end of
    the SAIL loop) in the first half, no function over 60 lines."""
    source = (HERE / "sail.py").read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert len(lines) <= 1000
    assert functions["sail"].end_lineno <= len(lines) / 2
    assert lines.index(next(line for line in lines if "PART 2: PLUMBING" in line)) > functions["sail"].end_lineno
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1}" for file in ("sail.py", "plumbing.py",
            "tiny_world.py") for node in ast.walk(ast.parse((HERE / file).read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def test_tiny_world_never_imports_sail():
    tree = ast.parse((HERE / "tiny_world.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" in imported and not imported & {"sail", "plumbing"}


def test_help_lists_every_setting_with_its_paper_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sail.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, paper in (("--n-candidates", "(paper: 8)"), ("--k-draws", "(paper: 10)"),
                        ("--beta", "(paper: 5000)"), ("--mix-alpha", "(paper: 0.25; 1 = no mixup)"),
                        ("--effective-batch", "(paper: 128)")):
        assert flag in text and paper in text


def test_ci_runs_the_readme_test_command_as_written():
    """.ci/run's first step is the README's Quickstart test command, read from the README."""
    readme = (HERE / "README.md").read_text().splitlines()
    commands = [line for line in readme
                if line.startswith("pip install -r requirements.txt && python -m pytest")]
    assert commands == ["pip install -r requirements.txt && python -m pytest -q"]
    ci = (HERE / ".ci" / "run").read_text()
    assert "grep -m1 '^pip install -r requirements.txt && python -m pytest' README.md" in ci
    assert 'bash -c "$command"' in ci
