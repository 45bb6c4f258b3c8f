"""What ``%dispy`` and ``%%dispy`` refuse, each with one line saying how to fix it,
before anything is sent; and their help."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from tests.jupyter.shell import cell

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("line", "body", "message"),
    [
        ('--over "[1]"', "x = 1\n", "defines no function"),
        ('--over "[1]" --into 1x', "def f(x):\n    return x\n", "variable name"),
        ('nothing --over "[1]"', "def f(x):\n    return x\n", "'nothing' is not"),
        ("", "def f(x):\n    return x\n", "--over"),
        ('--over "[1]" --progress fancy', "def f(x):\n    return x\n", "invalid"),
        # Each job failed: 'result of type 'coroutine' cannot be pickled ... (a
        # list, not a generator ...)' and "coroutine 'f' was never awaited".
        (
            '--over "[1]"',
            "async def f(x):\n    return x\n",
            r"^f is an async def function: .* \(return asyncio.run\(main\(x\)\)\)$",
        ),
        ('--over "[1]"', "def f(x):\n    yield x\n", "^f yields: each job would"),
        # Ran the cell, sent the job and cancelled it: "no job finished within
        # --timeout -5 s (1 cancelled): give it more seconds".
        ('--over "[1]" --timeout -5', "def f(x):\n    return x\n", "above 0, not -5"),
        ('--over "[1]" --timeout 0', "def f(x):\n    return x\n", "above 0, not 0 "),
    ],
)
def test_magic_cell_usage_errors(ip, line, body, message):
    with pytest.raises(UsageError, match=message):
        ip.run_cell_magic("dispy", line, body)


def test_a_function_of_an_earlier_cell_runs_from_a_dispy_line(ip):
    """``%%dispy outer --over ...`` with nothing under it: IPython refused it ('the
    cell body is empty. Did you mean the line magic %dispy?') and %dispy then
    said "invalid choice: 'outer'". The line now runs it as that cell would."""
    ip.run_cell("def twice(x):\n    return 2 * x\n")
    with capture_output() as captured:
        ip.run_line_magic("dispy", "twice --over 'range(3)' --into doubled")
    assert ip.user_ns["doubled"].results == [0, 2, 4], captured.stderr
    assert ip.user_ns["_dispy"] is ip.user_ns["doubled"]
    # A typo said "unknown option --over; did you mean --nodes?".
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", "twise --over 'range(3)'")
    assert str(raised.value).startswith(
        "%dispy twise: 'twise' is neither one of local, nodes, "
    ), raised.value
    assert str(raised.value).endswith("; did you mean twice? (see %dispy?)")


def test_a_method_or_a_modules_function_runs_from_a_dispy_line(ip):
    """``%dispy model.predict --over ...`` said "unknown option --over; did you mean
    --nodes?", and ``%%dispy model.predict`` "the function must be a name": a
    method of the notebook's object, or a module's function, runs as a function of
    the notebook does."""
    ip.run_cell(
        "import math\n"
        "class Model:\n"
        "    def __init__(self, k):\n"
        "        self.k = k\n"
        "    def predict(self, x):\n"
        "        return self.k * x\n"
        "model = Model(3)\n"
    )
    with capture_output() as captured:
        ip.run_line_magic("dispy", "model.predict --over 'range(3)' --into preds")
        ip.run_line_magic("dispy", "math.sqrt --over '[4, 9]' --into roots")
        ip.run_cell_magic("dispy", "model.predict --over '[5]' --into one", "x = 1\n")
    assert ip.user_ns["preds"].results == [0, 3, 6], captured.stderr
    assert ip.user_ns["roots"].results == [2.0, 3.0], captured.stderr
    assert ip.user_ns["one"].results == [15], captured.stderr
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", "model.predcit --over 'range(3)'")
    assert str(raised.value) == (
        "%dispy model.predcit: 'model.predcit' is not a function of the notebook "
        "(run the cell that defines it first, and check its spelling) (see %dispy?)"
    )


def test_an_input_that_cannot_be_sent_is_named_by_its_index(ip):
    """``--over "[1, 2, lock, 4]"`` said 'job argument 1 cannot be sent to a node':
    which of the inputs, a newcomer with a thousand of them could not tell."""
    from dispynb.jupyter.errors import MagicError

    ip.run_cell("import threading\nlock = threading.Lock()\n")
    with pytest.raises(MagicError) as raised, capture_output():
        ip.run_cell_magic(
            "dispy",
            '--over "[1, 2, lock, 4]" --into locked',
            "def f(x):\n    return x\n",
        )
    assert str(raised.value).startswith(
        "%%dispy could not start run 'locked': input 2: job argument 1 cannot be "
        "sent to a node: cannot pickle object of type 'lock'"
    ), raised.value


@pytest.mark.parametrize("word", ["help", "list"])
def test_a_builtin_named_alone_is_taken_for_an_action(ip, word):
    """``%dispy help`` said "the following arguments are required: --over" (the
    builtin run as a job function, d3dcb4d): it names the actions, as any word
    that is neither an action nor the notebook's."""
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", word)
    assert str(raised.value).startswith(
        f"%dispy {word}: {word!r} is neither one of local, nodes, "
    ), raised.value


@pytest.mark.parametrize(
    ("into", "message"),
    [
        ("print", "--into print would hide Python's built-in function print in"),
        ("len", "--into len would hide Python's built-in function len in"),
        ("class", "--into needs a variable name, not 'class'"),
        ("Out", "--into Out would replace IPython's Out in this notebook"),
    ],
)
def test_into_a_name_python_or_ipython_gives_is_refused(ip, into, message):
    """``--into print`` made ``print`` the run: ``print(1)`` in the next cells
    waited for the run and returned True, printing nothing. Refused before the
    cell's code runs, with nothing sent and nothing assigned."""
    before = ip.user_ns.get(into, "absent")
    ip.user_ns.pop("ran_the_body", None)
    with pytest.raises(UsageError) as raised:
        ip.run_cell_magic(
            "dispy",
            f'--over "[1]" --into {into}',
            "ran_the_body = 1\ndef f(x):\n    return x\n",
        )
    assert str(raised.value).startswith(message), raised.value
    assert "choose another name" in str(raised.value) or into == "class"
    assert ip.user_ns.get(into, "absent") is before
    assert "ran_the_body" not in ip.user_ns
    with capture_output() as captured:
        ip.run_cell("print('still printing')")
    assert captured.stdout == "still printing\n"


def test_over_a_number_says_range(ip):
    """``--over 5`` (five jobs wanted) said "--over '5' raised TypeError: 'int'
    object is not iterable"."""
    with pytest.raises(UsageError) as raised:
        cell(ip, "--over 5 --into five", "def f(x):\n    return x\n")
    assert str(raised.value) == (
        '--over 5 is one number, not the inputs: --over "range(5)" runs 5 jobs, '
        'with inputs 0 to 4; --over "[5]" runs one, with input 5 (no job was sent)'
    )


def test_a_setup_written_as_a_call_is_said_to_be_named(ip):
    """``--setup load()`` said "'load()' is not a function in the notebook",
    though the notebook had defined load."""
    ip.run_cell("def load():\n    pass\n")
    with pytest.raises(UsageError) as raised:
        cell(ip, '--over "[1]" --setup load()', "def f(x):\n    return x\n")
    assert str(raised.value) == (
        "--setup load(): name the function, without calling it: --setup load"
    )


def test_depends_takes_a_files_path_as_written(ip, tmp_path, monkeypatch):
    """``--depends data.csv``, as one writes a file's name, said "name 'data' is
    not defined in the notebook: run the cell that defines it first": it was read
    as Python. A path that is here is that file; one that is not is said so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    body = "def first_line(x):\n    return open('data.csv').readline()\n"
    for line in ("--depends data.csv", '--depends "data.csv"'):
        cell(ip, f'--over "[1]" --into read {line}', body)
        assert ip.user_ns["read"].results == ["a,b\n"], line
    with pytest.raises(UsageError) as raised:
        cell(ip, '--over "[1]" --depends dta.csv', body)
    assert str(raised.value) == (
        "--depends 'dta.csv': name 'dta' is not defined in the notebook: run the "
        "cell that defines it first, or fix the name; nor is there a file "
        f"'dta.csv' in {tmp_path} (where a relative path starts)"
    )
    # A DataFrame named data, its file not here: "'DataFrame' object has no
    # attribute 'csv'" alone, as if the file were not meant.
    ip.run_cell("class Frame:\n    pass\ndata = Frame()\n")
    (tmp_path / "data.csv").unlink()
    with pytest.raises(UsageError) as raised:
        cell(ip, '--over "[1]" --depends data.csv', body)
    assert str(raised.value) == (
        "--depends 'data.csv': 'Frame' object has no attribute 'csv'; nor is there "
        f"a file 'data.csv' in {tmp_path} (where a relative path starts)"
    )


@pytest.mark.parametrize(
    ("depends", "message"),
    [
        ("['missing.csv']", "--depends[0]: 'missing.csv' is not a file (a relative "),
        ("[__file__, 5]", "--depends[1]: 5 is not a dependency; give files"),
    ],
)
def test_a_depends_mistake_is_said_before_the_run_starts(ip, depends, message):
    """It failed as the run's cluster started, with how to start nodes ("start
    nodes on this machine with %dispy local, ...") though the nodes were fine."""
    ip.user_ns["__file__"] = __file__
    cell(ip, '--over "[1]" --into typo', "def f(x):\n    return x\n")
    earlier = ip.user_ns["typo"]
    with pytest.raises(UsageError) as raised:
        ip.run_cell_magic(
            "dispy",
            f'--over "[1]" --into typo --depends "{depends}"',
            "def f(x):\n    return x\n",
        )
    said = str(raised.value)
    assert said.startswith(message), said
    assert "%dispy" not in said, said
    assert ip.user_ns["typo"] is not earlier  # the name says what happened
    assert earlier.results == [1]


def test_a_misspelt_progress_in_the_environment_is_one_line(ip, monkeypatch):
    """``DISPYNB_PROGRESS=htm``: was ignored; now a usage error, not a traceback
    through Run.map and make_progress, and nothing is sent."""
    monkeypatch.setenv("DISPYNB_PROGRESS", "htm")
    with pytest.raises(UsageError) as raised:
        ip.run_cell_magic(
            "dispy", '--over "[1]" --into typo', "def f(x):\n    return x"
        )
    assert str(raised.value) == (
        "DISPYNB_PROGRESS='htm': use one of auto, widget, html, text or none "
        "(or unset it)"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("bogus", "'bogus' is neither one of local, nodes"),
        # Was: "the following arguments are required: action, HOST[:PORT]".
        ("", "^%dispy needs what to do: local, nodes, .* panel or close"),
        ("  # a comment", "^%dispy needs what to do"),
        ("nodes", "at least one"),
        ("status extra", "takes no hosts"),
        ("local --cpus 0", "at least 1"),
        ("local --adapt 0:2", "--adapt is for %dispy ssh and slurm"),
        ("ssh h1 --adapt 2", "--adapt takes MIN:MAX"),
        ("ssh h1 --adapt 3:2", "0 <= MIN <= MAX"),
        ("slurm --adapt 0:0", "MAX >= 1"),
        ("ssh h1 --adapt a:b", "not 'a:b'"),
        ("ssh h1 --adapt 0:2 --idle-timeout -1", "--idle-timeout must be"),
        ("local --register-host 10.0.0.2", "^--register-host is for %dispy ssh and"),
    ],
)
def test_magic_line_usage_errors(ip, line, message):
    with pytest.raises(UsageError, match=message):
        ip.run_line_magic("dispy", line)


@pytest.mark.parametrize("given", ["--secret s3cr3t-xyz", "--secret=s3cr3t-xyz"])
def test_a_secret_on_the_magic_line_is_refused_never_echoed(ip, given):
    """dispy users pass ``secret=``: ``%dispy nodes HOST --secret VALUE`` was taken
    as ``--secret-file`` (an abbreviation) and the error quoted the secret, saved
    with the notebook ("secret file 's3cr3t-xyz' does not exist")."""
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:9 {given}")
    message = str(raised.value)
    assert "s3cr3t" not in message, message
    assert message.startswith(
        "--secret: a secret on the magic line would be saved with the notebook"
    ), message
    assert "--secret-file" in message and "DISPYNB_SECRET" in message, message


def test_a_bad_secret_file_is_said_in_one_line_without_the_nodes_hint(ip, tmp_path):
    """The file is the notebook's problem, not the nodes': before, the error went on
    'check that dispynb-node runs there with the same secret (and TLS options), or
    start nodes here with %dispy local'."""
    missing = tmp_path / "nope"
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:9 --secret-file {missing}")
    assert str(raised.value) == (
        f"--secret-file: secret file '{missing}' does not exist: fix the path, or "
        f"make a new secret there with: dispynb secret {missing} (256 random bits, "
        "mode 600; the nodes and their clients need the same one)"
    )
    loose = tmp_path / "loose"
    loose.write_text("a-secret-of-the-lab-0123456789\n")
    loose.chmod(0o644)
    with pytest.raises(UsageError, match=f"restrict it with: chmod 600 {loose}$"):
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:9 --secret-file {loose}")
    assert "local nodes" in repr(ip.run_line_magic("dispy", "status"))  # kept


def test_magic_help_documents_every_option(ip):
    cell_doc = ip.find_cell_magic("dispy").__doc__
    line_doc = ip.find_line_magic("dispy").__doc__

    for option in (
        "--over",
        "--into",
        "--nowait",
        "--unpack",
        "--setup",
        "--progress",
        "--quiet",
        "--timeout",
        "--depends",
        "--on",
        "--reentrant",
        "function",
    ):
        assert option in cell_doc, option
    for option in (
        "local",
        "nodes",
        "status",
        "panel",
        "close",
        "--nodes",
        "--cpus",
        "--secret-file",
        "--cafile",
        "--certfile",
        "--keyfile",
        "--pulse",
    ):
        assert option in line_doc, option
