"""The pages a newcomer follows step by step (README, getting started, the how-tos)
work as written: the options they give the programs and magics exist, their notebook
cells run in IPython, and their self-contained Python samples run (no build needed)."""

from __future__ import annotations

import argparse
import builtins
import importlib
import re
import subprocess
import symtable
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The pages, in the order a newcomer reads them.
PAGES = [
    ROOT / "README.md",
    ROOT / "docs" / "index.md",
    ROOT / "docs" / "getting-started.md",
    *sorted((ROOT / "docs" / "howto").glob("*.md")),
    ROOT / "docs" / "security.md",
    *sorted((ROOT / "docs" / "explanation").glob("*.md")),
    ROOT / "schedserver" / "README.md",
]

#: Each program named in the pages, and the module whose ``build_parser`` it runs.
PROGRAMS = {
    "dispynb-node": "nodeserver.cli",
    "python -m nodeserver": "nodeserver.cli",
    "dispynb-scheduler": "schedserver.cli",
    "python -m schedserver": "schedserver.cli",
    "dispynb demo": "dispynb.cli",
    "./dev demo": "dispynb.cli",
    "dispynb secret": "dispynb.cli",
    "dispynb run": "dispynb.cli",
}

#: Seconds for one page's cells or one sample (each starts its own local nodes).
SAMPLE_TIMEOUT = 90


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
        found |= set(action.option_strings)
    return found


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _ids(pages: list[Path]) -> list[str]:
    return [str(page.relative_to(ROOT)) for page in pages]


def _mentions(text: str, program: str) -> list[tuple[str, str]]:
    """``(option, line)`` for each ``--option`` on a line after ``program``: in code
    blocks, inline code and ``{option}`dispynb-node --x``` roles alike."""
    found = []
    for line in re.findall(rf"(?<![\w-]){re.escape(program)}(?![\w-])[^`\n]*", text):
        for option in re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", line):
            found.append((option, line.strip()))
    return found


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_pages_give_the_programs_only_options_they_have(program: str) -> None:
    options = _options(importlib.import_module(PROGRAMS[program]).build_parser())
    unknown = [
        f"{page.relative_to(ROOT)}: {option} in {line!r}"
        for page in PAGES
        for option, line in _mentions(page.read_text(encoding="utf-8"), program)
        if option not in options
    ]
    assert not unknown, "\n".join(unknown)


def test_the_scheduler_page_names_only_options_of_its_programs() -> None:
    """schedserver/README.md names options without the program before them: each
    is one of dispynb-scheduler's or (for the nodes) dispynb-node's."""
    options = set()
    for module in ("schedserver.cli", "nodeserver.cli"):
        options |= _options(importlib.import_module(module).build_parser())
    text = (ROOT / "schedserver" / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", text))
    assert "--max_cpus" in named
    assert not named - options, sorted(named - options)


def test_pages_give_the_magics_only_options_they_have() -> None:
    from dispynb.jupyter.magics import ACTIONS, DispyMagics
    from dispynb.jupyter.magicsupport import dotted_name

    line_options = _options(DispyMagics.dispy.parser)
    cell_options = _options(DispyMagics.cell_dispy.parser)
    unknown = []
    seen = 0
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for magic, line in re.findall(r"(?m)(%%?dispy)(?![\w-])([^`\n]*)", text):
            # %dispy NAME --over ...: a function of the notebook (model.predict
            # too), run as %%dispy.
            first = (line.split() or [""])[0]
            runs = dotted_name(first) and first not in ACTIONS
            known = cell_options if magic == "%%dispy" or runs else line_options
            for option in re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", line):
                seen += 1
                if option.split("=")[0] not in known:
                    unknown.append(f"{page.relative_to(ROOT)}: {magic}{line}")
    assert seen, "the pages show the magics' options"
    assert not unknown, "\n".join(unknown)


#: Runs a page's notebook cells, in order, in one IPython shell; exits 1 at the
#: first cell that fails, naming it.
CELLS_RUNNER = """
import json
import sys

from IPython.testing.globalipapp import start_ipython

shell = start_ipython()
try:
    for cell in json.load(sys.stdin):
        outcome = shell.run_cell(cell)
        if not outcome.success:
            sys.exit(f"this cell failed:\\n{cell}")
finally:
    shell.run_cell("%dispy close")
"""


def _notebook_cells(page: Path) -> list[str]:
    return [b for b in _blocks(page.read_text(encoding="utf-8"), "python") if "%" in b]


NOTEBOOK_PAGES = [page for page in PAGES if _notebook_cells(page)]


@pytest.mark.slow
@pytest.mark.timeout(SAMPLE_TIMEOUT + 30)
@pytest.mark.parametrize("page", NOTEBOOK_PAGES, ids=_ids(NOTEBOOK_PAGES))
def test_notebook_cells_of_a_page_run(page: Path, tmp_path: Path) -> None:
    """The cells a page shows (``%load_ext dispynb``, ``%dispy local``, a ``%%dispy``
    cell) run in IPython as printed."""
    import json

    done = subprocess.run(
        [sys.executable, "-c", CELLS_RUNNER],
        input=json.dumps(_notebook_cells(page)),
        capture_output=True,
        text=True,
        timeout=SAMPLE_TIMEOUT,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "%%dispy" in "".join(_notebook_cells(page))


def _free_names(code: str) -> set[str]:
    """Global names ``code`` reads but neither defines nor imports (builtins aside)."""
    table = symtable.symtable(code, "<sample>", "exec")
    defined = {
        s.get_name()
        for s in table.get_symbols()
        if s.is_assigned() or s.is_imported() or s.is_namespace()
    }
    read: set[str] = set()
    pending = [table]
    while pending:
        current = pending.pop()
        pending += current.get_children()
        for symbol in current.get_symbols():
            top = current is table
            if symbol.is_referenced() and (top or symbol.is_global()):
                read.add(symbol.get_name())
    return read - defined - set(dir(builtins))


def _samples() -> list[tuple[Path, str]]:
    """The Python samples that stand alone: no magic, no name left to the reader
    (``compute``, ``cluster``, ...), no ``...`` to fill in, no remote host."""
    samples = []
    for page in PAGES:
        for block in _blocks(page.read_text(encoding="utf-8"), "python"):
            if "%" in block or re.search(r"^\s*\.\.\.$", block, re.M):
                continue
            if not _free_names(block):
                samples.append((page, block))
    return samples


SAMPLES = _samples()


def test_free_names_tell_a_sample_from_a_fragment() -> None:
    assert (
        _free_names("import os\ndef f(n):\n    return os.sep * n\nf(len([1]))") == set()
    )
    assert _free_names("cluster = JobCluster(compute)") == {"JobCluster", "compute"}
    assert any(page.name == "futures.md" for page, _ in SAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(SAMPLE_TIMEOUT + 30)
@pytest.mark.parametrize(
    "sample",
    [block for _, block in SAMPLES],
    ids=[f"{page.relative_to(ROOT)}-{i}" for i, (page, _) in enumerate(SAMPLES)],
)
def test_a_self_contained_sample_runs(sample: str, tmp_path: Path) -> None:
    script = tmp_path / "sample.py"
    script.write_text(sample, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=SAMPLE_TIMEOUT,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_nodes_of_a_scheduler_are_started_to_wait_for_it() -> None:
    """schedserver/README.md started each node of a scheduler with ``--register
    HOST:9714``, a launcher's option: such a node stops if it cannot register within
    30 s, so lab machines booted before the scheduler lost their nodes for good.
    Every node command the pages give for a scheduler's registration port waits
    (``--scheduler_host``, as the node's main gives no patience limit)."""
    import shlex

    from dispynb.defaults import SCHEDULER_REGISTER_PORT
    from nodeserver.parser import parse_args

    found = []
    for page in PAGES:
        for block in _blocks(page.read_text(encoding="utf-8"), "sh"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "dispynb-node" not in words:
                    continue
                argv = [  # a shell variable ($SLURM_CPUS_PER_TASK): a number
                    "1" if word.startswith("$") else word
                    for word in words[words.index("dispynb-node") + 1 :]
                ]
                args = parse_args(argv)
                if args.register and args.register.endswith(
                    f":{SCHEDULER_REGISTER_PORT}"
                ):
                    found.append((page.name, line.strip(), bool(args.scheduler_host)))
    assert found, "no node of a scheduler in the pages"
    assert all(waits for _page, _line, waits in found), [
        (page, line) for page, line, waits in found if not waits
    ]


def _shell_lines(block: str) -> list[str]:
    """A ``sh`` block's commands, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line]


@pytest.mark.timeout(SAMPLE_TIMEOUT)
def test_the_pages_certificate_recipe_makes_a_node_clients_verify(
    tmp_path: Path,
) -> None:
    """secure-nodes.md shows how to make the node.pem and node.key it then gives the
    node (and sched.pem for the scheduler): that command, for 127.0.0.1, makes a
    certificate a node serves TLS with and a client verifies with ``cafile=``."""
    import shutil

    from dispynb import JobCluster
    from tests.nodeproc import running_node

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    recipe = _certificate_recipe("-out node.pem")
    assert "-out node.pem" in recipe[0] and "-keyout node.key" in recipe[0]
    script = " && ".join(recipe).replace("IP:10.0.0.5", "IP:127.0.0.1")
    subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, timeout=30)
    pem, key = tmp_path / "node.pem", tmp_path / "node.key"
    with running_node(
        tmp_path / "node", "--certfile", str(pem), "--keyfile", str(key)
    ) as node:
        with JobCluster(
            abs, nodes=[node.spec], secret=node.secret, cafile=str(pem)
        ) as cluster:
            assert cluster.submit(-3)() == 3
        assert "with TLS" in node.log_text()


def _certificate_recipe(made: str) -> list[str]:
    """The ``openssl`` and ``chmod`` lines of the secure-nodes.md block that ``made``
    is in (its other commands are the programs it then starts)."""
    page = (ROOT / "docs" / "howto" / "secure-nodes.md").read_text(encoding="utf-8")
    recipe = [
        line
        for block in _blocks(page, "sh")
        if made in block
        for line in _shell_lines(block)
        if line.startswith(("openssl", "chmod"))
    ]
    assert recipe, f"securing nodes shows how to make a certificate ({made})"
    return recipe


@pytest.mark.timeout(SAMPLE_TIMEOUT)
def test_the_pages_ca_recipe_makes_node_certificates_clients_verify_with_the_ca(
    tmp_path: Path,
) -> None:
    """secure-nodes.md's recipe for a lab's own CA (before: "sign each node's
    certificate with a CA of your own", and no command): run as written, for
    127.0.0.1, the node serves TLS with the certificate the CA signed, a client
    giving ``cafile=ca.pem`` verifies it, and the keys are private."""
    import shutil

    from dispynb import JobCluster
    from tests.nodeproc import running_node

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    recipe = _certificate_recipe("-out ca.pem")
    script = " && ".join(recipe).replace("IP:10.0.0.6", "IP:127.0.0.1")
    subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, timeout=30)
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    pem, key = tmp_path / "node2.pem", tmp_path / "node2.key"
    assert key.stat().st_mode & 0o077 == 0
    with running_node(
        tmp_path / "node", "--certfile", str(pem), "--keyfile", str(key)
    ) as node:
        with JobCluster(
            abs, nodes=[node.spec], secret=node.secret, cafile=str(tmp_path / "ca.pem")
        ) as cluster:
            assert cluster.submit(-3)() == 3
        assert "with TLS" in node.log_text()


def _commands(text: str) -> list[str]:
    """The commands of a page: each line of its ``sh`` blocks (continuations joined,
    comments dropped) and each inline code span (one line, even when the page wraps
    it over two)."""
    commands = [line for block in _blocks(text, "sh") for line in _shell_lines(block)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return commands


#: The benchmark's pages: how to run it, and its report (which gives the command of
#: each run it cites).
BENCH_PAGES = [
    ROOT / "docs" / "howto" / "benchmark.md",
    ROOT / "docs" / "benchmarks.md",
]


def test_pages_run_the_benchmark_with_arguments_it_takes() -> None:
    """Every ``./dev bench ...`` and ``bench/run.py ...`` the pages give parses with
    the benchmark's own parser, backends and workloads included, as typed."""
    import contextlib
    import importlib.util
    import io
    import shlex

    spec = importlib.util.spec_from_file_location(
        "bench_run", ROOT / "bench" / "run.py"
    )
    assert spec and spec.loader
    run = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))  # run.py imports its neighbours
    try:
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    wrong, seen = [], 0
    for page in [*PAGES, *BENCH_PAGES]:
        for command in _commands(page.read_text(encoding="utf-8")):
            found = re.search(r"(?:\./dev bench|bench/run\.py)(?![\w-])(.*)", command)
            if not found:
                continue
            seen += 1
            error = io.StringIO()
            try:
                with (
                    contextlib.redirect_stderr(error),
                    contextlib.redirect_stdout(error),
                ):
                    run.parse_args(shlex.split(found[1], comments=True))
            except SystemExit as exit:  # --help exits 0
                if not exit.code:
                    continue
                why = error.getvalue().strip().splitlines()[-1:]
                wrong.append(f"{page.relative_to(ROOT)}: {command!r}: {why}")
    assert seen > 10, "the pages give the benchmark's commands"
    assert not wrong, "\n".join(wrong)
