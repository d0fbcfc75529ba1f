"""Every public name of the library has a docstring with a summary line; the docs' shell
commands parse and the scripts they name exist."""

import importlib
import inspect
import pkgutil
import re
import shlex
from pathlib import Path

import pytest

import hypergrad

MODULES = sorted(m.name for m in pkgutil.walk_packages(hypergrad.__path__, "hypergrad."))


def public_names(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere
        yield name, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                yield f"{name}.{attr}", member


@pytest.mark.parametrize("name", MODULES)
def test_public_names_have_docstrings(name):
    module = importlib.import_module(name)
    assert (module.__doc__ or "").strip(), f"{name} has no module docstring"
    missing = [n for n, obj in public_names(module) if not (obj.__doc__ or "").strip()]
    assert not missing, f"{name}: no docstring for {', '.join(missing)}"


# --- The documentation's code blocks -------------------------------------------------------
#
# The site (docs/, built by ``sphinx-build``) executes its Python: every Python example is a
# MyST-NB code cell or a notebook, run during the build. The shell blocks are checked here.

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md")
    if not {"_build", "jupyter_execute"} & set(p.relative_to(ROOT / "docs").parts))
SHELL_FENCES = ("bash", "console", "sh", "shell")
# An upper-case word (NAME, PATH, DIR, DATE-TIME, N, $I) is a placeholder for the reader.
PLACEHOLDER = re.compile(r"(?<![A-Za-z0-9])\$?[A-Z][A-Z0-9_]*(?![a-z0-9])")


def shell_lines(path):
    """(line number, command) for every command of a fenced shell block in ``path``.

    Continuation lines (a trailing backslash) are joined; in ``console`` blocks only lines
    with a ``$ `` prompt are commands (the rest is output); a ``$ `` prompt is dropped.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    fence, out, i = None, [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip().strip("{}").split()[0] if stripped[3:].strip() else ""
            else:
                fence = None
            i += 1
            continue
        if fence in SHELL_FENCES:
            start, text = i + 1, stripped
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            if fence == "console":
                if text.startswith("$ "):
                    out.append((start, text[2:]))
            elif text and not text.startswith("#"):
                out.append((start, text[2:] if text.startswith("$ ") else text))
        i += 1
    return out


def hypergrad_commands():
    """Every ``hypergrad ...`` command of the shell blocks of README.md and docs/**/*.md.

    A line is split at ``&&`` and ``;``; each part that begins with ``hypergrad `` is a
    command. Square brackets mark optional parts and are dropped (what they hold is
    checked too). A command with a placeholder — an upper-case word such as NAME, PATH,
    DIR, DATE-TIME, N, or a shell variable like ``$I``, outside a ``#`` comment — is a
    template for the reader and is skipped by these tests
    (``test_template_commands_are_few`` keeps that list short), except in the ``--workdir``
    of a ``--resume`` line: the run directory is neither looked up nor read here.
    """
    found = []
    for path in DOC_FILES:
        for lineno, text in shell_lines(path):
            for part in re.split(r"&&|;", text):
                part = part.strip()
                if not part.startswith("hypergrad "):
                    continue
                part = part.replace("[", "").replace("]", "")
                argv = shlex.split(part, comments=True)[1:]
                where = f"{path.relative_to(ROOT)}:{lineno}"
                # --resume continues an existing run: its --workdir is not looked at here,
                # so a placeholder there (runs/seed-cnn-DATE-TIME) leaves the line checked
                skip = {i + 1 for i, a in enumerate(argv) if a == "--workdir"} \
                    if "--resume" in argv else set()
                template = any(PLACEHOLDER.search(a) for i, a in enumerate(argv) if i not in skip)
                found.append((where, argv, template))
    return found


COMMANDS = hypergrad_commands()


def test_the_docs_have_commands():
    checked = [c for c in COMMANDS if not c[2]]
    assert len(checked) >= 25, f"only {len(checked)} hypergrad commands found in the docs"


def test_template_commands_are_few():
    templates = [f"{where}: hypergrad {' '.join(argv)}" for where, argv, t in COMMANDS if t]
    assert len(templates) <= 10, "\n".join(templates)


@pytest.mark.parametrize("where,argv", [(w, a) for w, a, t in COMMANDS if not t],
                         ids=[w for w, _, t in COMMANDS if not t])
def test_documented_command_parses(where, argv, capsys):
    """The command parses, and for run and check its experiment and ``--set`` values are
    accepted; nothing runs (a ``--resume`` workdir need not exist)."""
    from hypergrad import cli
    from hypergrad.config import ConfigError

    try:
        args = cli._parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `hypergrad {' '.join(argv)}` does not parse "
                    f"(exit {e.code}): {capsys.readouterr().err.strip()}")
    if args.command in ("run", "check"):
        name = args.experiment or cli.DEFAULT_EXPERIMENT
        try:
            cli._resolve(name, args.sets)
        except ConfigError as e:
            pytest.fail(f"{where}: `hypergrad {' '.join(argv)}`: {e}")


SCRIPT = re.compile(r"\b(?:python3?|bash)\s+(scripts/[\w./-]+\.(?:py|sh))")


def test_documented_scripts_exist():
    """Every ``python scripts/X.py`` and ``bash scripts/X.sh`` the docs mention exists."""
    missing, seen = [], 0
    for path in DOC_FILES:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for script in SCRIPT.findall(line):
                seen += 1
                if not (ROOT / script).is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {script}")
    assert seen >= 10
    assert not missing, "\n".join(missing)


def test_readme_example_is_executed_by_the_docs():
    """README's Python example is the first code cell of docs/getting_started.md, which
    the docs build executes: so the README's example runs as written."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (ROOT / "docs" / "getting_started.md").read_text(encoding="utf-8")
    example = re.search(r"```python\n(.*?)```", readme, re.S)
    cell = re.search(r"```\{code-cell\} ipython3\n(.*?)```", page, re.S)
    assert example and cell
    assert example.group(1).strip() == cell.group(1).strip()


def test_no_links_to_the_old_guide():
    """docs/guide.md was split into the site's pages, and the notebooks moved to
    docs/notebooks/: nothing may point to the old places."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = [f"{p.relative_to(ROOT)}:{n}" for p in DOC_FILES
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if "guide.md" in line]
    stale += [f"README.md: {m}" for m in re.findall(r"(?<!docs/)notebooks/", readme)]
    assert not stale, "\n".join(stale)
