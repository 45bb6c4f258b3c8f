"""What a person sees in a notebook cell, in a real kernel: tracebacks naming the
cell's prompt and editor lines, short errors when no node can be used, help and
misspelt options, labelled remote prints."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster
from tests.jobs import wait_until
from tests.jupyter.kernel import CellOutput, Kernel, kernel, node_pids, wait_gone
from tests.ports import PortHolder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with kernel(tmp_path_factory.mktemp("kernel")) as started:
        started.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
        yield started


def test_remote_traceback_names_the_cell_prompt_and_editor_lines(k):
    out = k.execute(
        '%%dispy --over "[0]" --into broken\n'  # line 1
        "def ratio(x):\n"
        "    return 10 / x\n"  # line 3
        "\n"
        "def compute(x):\n"
        "    scaled = x * 2\n"
        "    return ratio(scaled)\n"  # line 7
    )
    prompt = out.execution_count
    assert f"Cell In[{prompt}], line 7, in compute\n    return ratio(scaled)\n" in (
        out.stderr
    ), out.text
    assert f"Cell In[{prompt}], line 3, in ratio\n    return 10 / x\n" in out.stderr
    assert "ZeroDivisionError: division by zero" in out.stderr


def test_a_large_capture_warning_names_the_cell_not_its_temporary_file(k):
    k.run_ok("samples = list(range(300_000))")
    out = k.run_ok(
        '%%dispy --over "[0, 5]" --into picked\n'
        "def pick(i):\n"  # line 2
        "    return samples[i]\n"
    )
    # Before: "/tmp/ipykernel_NNN/NNN.py:2: LargeCaptureWarning: ...".
    assert (
        f"Cell In[{out.execution_count}]:2: LargeCaptureWarning: pick (computation)"
        in out.stderr
    ), out.text
    assert "\n  def pick(i):\n" in out.stderr, out.text  # and its line, as before
    assert "ipykernel_" not in out.stderr, out.text


def test_a_job_that_appends_to_a_notebook_list_is_said_to_change_a_copy(k):
    """``collected.append(x)`` in a job left the notebook's list empty and the
    results all None, without a word: the cell says why, before the jobs run."""
    k.run_ok("collected = []")
    out = k.run_ok(
        '%%dispy --over "range(3)" --into appended\n'
        "def collect(x):\n"  # line 2
        "    collected.append(x * x)\n"
    )
    assert (
        f"Cell In[{out.execution_count}]:2: LostChangeWarning: collect changes "
        "collected, a global of the notebook, and returns nothing: each job changes "
        "a copy of collected on its node, never the one of the notebook"
    ) in out.stderr, out.text
    assert k.value("(collected, appended.results)") == ([], [None, None, None])


def test_a_web_monitor_made_and_shown_in_one_cell_shows_its_link_once(k):
    """``monitor = DispyHTTPServer(run)`` then ``monitor`` on the cell's last line
    showed the same link twice; shown in a later cell, it shows it again."""
    k.run_ok('%%dispy --over "range(2)" --into watched\ndef f(x):\n    return x\n')
    made = k.run_ok(
        "from dispynb.httpd import DispyHTTPServer\n"
        "monitor = DispyHTTPServer(watched, port=0)\n"
        "monitor\n"
    )
    try:
        url = k.value("monitor.url")
        links = [d for d in made.data if url in d.get("text/html", "")]
        assert len(links) == 1, made.data
        later = k.run_ok("monitor")
        assert [url in d.get("text/html", "") for d in later.data] == [True]
    finally:
        k.run_ok("monitor.shutdown()")


def test_a_jobs_warning_names_the_cell_not_the_kernels_file(k):
    """A job's ``warnings.warn`` showed "[input 0] /tmp/ipykernel_NNN/NNN.py:4:
    UserWarning: ...": a file no one sees. It names the cell, as tracebacks do."""
    out = k.run_ok(
        '%%dispy --over "[0]" --into warned\n'
        "def careful(x):\n"
        "    import warnings\n"
        "    warnings.warn(f'careful with {x}')\n"  # line 4
        "    return x\n"
    )
    assert (
        f"[input 0] Cell In[{out.execution_count}]:4: UserWarning: careful with 0\n"
        in out.stderr
    ), out.text
    assert "ipykernel_" not in out.stderr, out.text
    assert "ipykernel_" in k.value("warned.jobs[0].stderr")  # the raw text is kept


def test_local_error_in_the_cell_body_names_the_editor_line(k):
    out = k.execute(
        '%%dispy --over "[1]"\ndef f(x):\n    return x\nundefined_name\n'  # line 4
    )
    assert out.ename == "NameError"
    assert f"Cell In[{out.execution_count}], line 4" in out.error_text, out.text


def test_run_all_stops_at_a_cell_whose_own_code_raised(k, tmp_path):
    """Run All queues the cells; a failed cell must abort the rest (an ``ok`` reply
    let them run on, on an earlier cell's run or on nothing)."""
    # ipykernel aborts the requests queued when a cell fails: the cell's code waits
    # until the next one is sent, as Run All has sent it (under load, a cell failing
    # at once could otherwise beat the kernel's own reading of the next request).
    sent = tmp_path / "sent"
    failing = k.submit(
        '%%dispy --over "[1]" --into never\n'
        "import os, time\n"
        "def f(x):\n"
        "    x\n"
        "deadline = time.monotonic() + 30\n"
        f"while not os.path.exists({str(sent)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "nope\n"
    )
    after = k.submit("ran_after = True")
    sent.touch()
    out = k.collect(failing)
    assert out.status == "error" and out.ename == "NameError", out.text
    assert "dispynb: no jobs were submitted: the cell's code raised" in out.text
    assert k.collect(after).status == "aborted"
    assert "NameError" in k.value("repr(never)")


def test_run_all_stops_at_a_cell_whose_jobs_all_failed(k):
    """Every job of the cell raised: nothing to go on with, so the cell fails
    after showing the remote traceback, in one line of its own, and Run All stops
    (an ``ok`` reply ran the next cells on no results)."""
    failing = k.submit('%%dispy --over "[0, 0]" --into none\ndef f(x):\n    1 / x\n')
    after = k.submit("ran_after = True")
    out = k.collect(failing)
    assert out.status == "error", out.text
    assert "ZeroDivisionError: division by zero" in out.stderr
    # How many, and where they all are, each name whole. It read as a second
    # error, 'ZeroDivisionError: 2 jobs (first: job 7); see none.failures or
    # .df.exception', under the traceback's own 'ZeroDivisionError: ...' line.
    assert re.search(
        r"\n2 jobs failed \(ZeroDivisionError\), input \d shown above; see "
        r"none\.failures or none\.df\.exception\n",
        out.stderr,
    ), out.stderr
    assert out.error_text.strip() == (
        "dispynb: all 2 jobs of run 'none' failed (ZeroDivisionError): the "
        "traceback is above; none.failures has them"
    ), out.error_text
    assert k.collect(after).status == "aborted"
    assert k.value("len(none.failures)") == 2


def test_an_error_in_the_inputs_shows_the_users_lines_not_dispynbs(k):
    # A name the notebook lacks (a typo, a cell not run yet): one line naming the
    # expression and the fix, not a traceback of get_ipython().run_cell_magic(...)
    # and hidden frames (before).
    out = k.execute('%%dispy --over "rang(4)" --into typo\ndef f(x):\n    return x\n')
    assert (
        "UsageError: --over 'rang(4)': name 'rang' is not defined in the notebook: "
        "run the cell that defines it first, or fix the name" in out.text
    ), out.text
    _short(out.text)
    assert "run_cell_magic" not in out.text, out.text
    # A NameError inside a function the expression calls keeps its traceback.
    made = k.run_ok("def inputs_of_typo():\n    return rang(4)\n")
    out = k.execute(
        '%%dispy --over "inputs_of_typo()" --into typo\ndef f(x):\n    return x\n'
    )
    assert out.ename == "NameError", out.text
    assert f"Cell In[{made.execution_count}], line 2" in out.error_text
    assert "dispynb/" not in out.error_text and "Could not get source" not in out.text
    out = k.execute("%%dispy --over 0.5 --into typo\ndef f(x):\n    return x\n")
    assert "UsageError: --over '0.5' raised TypeError: 'float' object is not" in (
        out.text
    )
    _short(out.text)
    out = k.execute('%%dispy --over "range(4" --into typo\ndef f(x):\n    return x\n')
    assert "UsageError: --over 'range(4': '(' was never closed" in out.text, out.text
    _short(out.text)

    made = k.run_ok('def inputs():\n    yield 1\n    raise RuntimeError("no 2")\n')
    out = k.execute(
        '%%dispy --over "inputs()" --into partial\ndef f(x):\n    return x\n'
    )
    assert out.ename == "RuntimeError", out.text
    assert f"Cell In[{made.execution_count}], line 3, in inputs" in out.error_text
    assert "dispynb/" not in out.error_text, out.error_text
    # The name says what happened: no run from an earlier cell left under it.
    assert "RuntimeError: no 2" in k.value("repr(partial)")


def test_inputs_the_function_cannot_take_say_to_unpack_and_send_no_job(k):
    """Pairs over a function of two arguments: each pair is its one argument, so
    every job failed on the node with 'missing 1 required positional argument',
    nothing saying --unpack. Now the cell says so at once and sends no job."""
    cell = (
        '%%dispy --over "[(1, 2), (3, 4)]" --into pairs{}\n'
        "def add(x, y):\n"
        "    return x + y"
    )
    out = k.execute(cell.format(""))
    said = (
        "add(x, y) cannot take --over's first input, (1, 2): missing a required "
        "argument: 'y'; add --unpack to pass its items as the arguments (no job "
        "was sent)"
    )
    assert out.status == "error" and out.text.strip() == f"UsageError: {said}", out
    assert k.value("pairs.jobs") == []
    assert k.value("pairs.error") == said  # the name says why, not a stale run
    k.run_ok(cell.format(" --unpack"))
    assert k.value("pairs.results") == [3, 7]


def test_a_dataframe_over_says_how_to_go_over_its_rows_and_sends_no_job(k):
    """``--over params``, a DataFrame of parameters: iterating it gives its column
    names, so the jobs ran on 'lr' and 'depth' (and failed there, or returned
    nonsense). The cell says how to go over its rows instead, and sends no job."""
    k.run_ok(
        "import pandas as pd\n"
        "params = pd.DataFrame({'lr': [0.1, 0.01], 'depth': [3, 5]})"
    )
    cell = (
        '%%dispy --over "{}" --into fits{}\ndef fit(lr, depth):\n    return lr * depth'
    )
    out = k.execute(cell.format("params", ""))
    said = (
        "--over params is a DataFrame: going over it gives its column names "
        "('lr', 'depth'), one job each; for one job per row, use --over "
        "\"params.to_dict('records')\" --unpack (a row's columns as keyword "
        'arguments) or --over "params.itertuples()" (no job was sent)'
    )
    assert out.status == "error" and out.text.strip() == f"UsageError: {said}", out
    assert k.value("fits.jobs") == []
    assert k.value("fits.error") == said
    k.run_ok(cell.format("params.to_dict('records')", " --unpack"))
    assert k.value("fits.results") == [0.1 * 3, 0.01 * 5]


def test_a_file_the_notebook_sees_but_not_the_job_says_to_send_it(k):
    """A job opens 'data.csv', there beside the notebook: it runs in a directory of
    its own on the node, where the file is not. The traceback ends at the cell's
    line (before: a frame of IPython's own open() too, the kernel's wrapper of it
    travelling with the function), and a line says how to send the file."""
    k.run_ok("open('data.csv', 'w').write('x,y')")
    cell = (
        '%%dispy --over "range(2)" --into reads{}\n'
        "def head(i):\n"
        "    with open('data.csv') as table:\n"
        "        return table.read()"
    )
    out = k.execute(cell.format(""))
    assert out.status == "error", out.text
    shown = out.stderr
    assert "FileNotFoundError: [Errno 2] No such file or directory: 'data.csv'" in shown
    assert "interactiveshell" not in shown and "io_open" not in shown, shown
    assert shown.count("Cell In[") == 1, shown
    assert (
        "dispynb: a job looks for 'data.csv' in a directory of its own on its node, "
        "not in the notebook's: send the file with the run (%%dispy --depends "
        "\"['data.csv']\"), or open it by its absolute path on nodes that share "
        "this machine's files\n"
    ) in shown, shown
    k.run_ok(cell.format(" --depends \"['data.csv']\""))
    assert k.value("reads.results") == ["x,y", "x,y"]


def test_a_module_beside_the_notebook_says_how_to_send_it(k):
    """``from tools import scale`` works in the notebook (tools.py beside it); the
    nodes cannot import it (their jobs run in a directory of their own). The cell
    says so with the --depends that sends it, not that the nodes are the problem;
    likewise for a job that imports such a module itself."""
    k.run_ok(
        "open('tools.py', 'w').write('def scale(x):\\n    return 10 * x\\n')\n"
        "open('jobtools.py', 'w').write('TEN = 10\\n')\n"
        "from tools import scale"
    )
    cell = '%%dispy --over "range(3)" --into scaled{}\ndef f(x):\n    return scale(x)'
    out = k.execute(cell.format(""))
    assert out.status == "error", out.text
    assert "No module named 'tools'" in out.text, out.text
    # Said once: the node's remote traceback, its frames all dispynb's, added a
    # second line 'ModuleNotFoundError: No module named 'tools''.
    assert out.text.count("No module named 'tools'") == 1, out.text
    assert (
        "dispynb: tools is your module (" in out.text
        and "tools.py), which the nodes do not have: send it with the run "
        "(%%dispy --depends \"['tools.py']\"), or install it on the nodes"
        in out.text
    ), out.text
    assert "%dispy local" not in out.text, out.text  # the nodes are fine
    # Said once, in %%dispy's words (before, the node's too: '(is a module it
    # needs missing on the node? install it there, or send it with depends)').
    assert "send it with depends" not in out.text, out.text
    k.run_ok(cell.format(" --depends \"['tools.py']\""))
    assert k.value("scaled.results") == [0, 10, 20]
    inside = "def g(x):\n    import jobtools\n    return jobtools.TEN * x"
    out = k.execute(f'%%dispy --over "range(2)" --into inside\n{inside}')
    assert "(%%dispy --depends \"['jobtools.py']\")" in out.stderr, out.text
    assert "JobCluster(" not in out.stderr, out.text  # said once, as %%dispy says it
    assert "2 jobs failed (ModuleNotFoundError), input" in out.stderr, out.text
    out = k.execute(
        '%%dispy --over "range(2)" --into third\ndef h(x):\n    import nosuch\n'
    )
    assert "No module named 'nosuch'" in out.text and "your module" not in out.text


def test_a_cell_run_again_lets_go_of_its_earlier_run_and_results(k):
    """A notebook keeps the results its variables hold: a cell run again (its
    name now the new run's) lets go of the earlier run, 20 MB of results here.
    Before, the session kept every run it started until the kernel restarted."""
    cell = '%%dispy --over "range(2)" --into big\ndef big(i):\n    return bytes(10**7)'
    k.run_ok(cell)
    k.run_ok("import gc, weakref\nearlier = weakref.ref(big)")
    k.run_ok(cell)
    assert k.value("gc.collect() >= 0 and earlier() is None") is True
    assert k.run_ok("%dispy status").text.count("<Run 'big' 2/2 done") == 1


def test_remote_prints_carry_the_job_label_and_df_the_raw_text(k):
    out = k.run_ok(
        '%%dispy --over "range(3)" --into talk\ndef talk(x):\n    print("hi", x)\n'
    )
    assert sorted(out.stdout.splitlines()) == sorted(
        f"[input {i}] hi {i}" for i in range(3)
    )
    assert k.value("list(talk.df.stdout)") == [f"hi {i}\n" for i in range(3)]


def test_a_flood_of_job_output_is_cut_short_in_the_cell_and_kept_in_the_run(k):
    """Jobs printing megabytes: JupyterLab's server drops everything a kernel sends
    above 1 MB/s over 3 s ("IOPub data rate exceeded"), progress and tracebacks
    too. The cell shows each job's first and last lines and says where the rest is;
    the run keeps every character, and a failure after the flood still shows."""
    out = k.execute(
        '%%dispy --over "range(4)"\n'
        "def chatty(x):\n"
        "    for i in range(200_000):\n"
        '        print("step", i)\n'
        "    if x == 3:\n"
        '        raise ValueError("diverged")\n'
        "    return x\n",
        timeout=120,
    )
    shown = len(out.stdout) + len(out.stderr)
    assert shown < 1_000_000, f"{shown} characters sent to the cell"
    for index in range(4):
        assert f"[input {index}] step 0\n" in out.stdout
        assert f"[input {index}] step 199999\n" in out.stdout  # the tail too
        assert f"not shown; _dispy.jobs[{index}].stdout has them all" in out.stdout
    assert 'raise ValueError("diverged")' in out.stderr  # the traceback survives
    assert "ValueError: diverged" in out.stderr
    raw = k.value("[len(text) for text in _dispy.df.stdout]")
    assert raw == [len("".join(f"step {i}\n" for i in range(200_000)))] * 4


def test_a_function_using_an_unpicklable_global_is_named_without_a_nodes_hint(k):
    k.run_ok("import threading\nlock = threading.Lock()")
    out = k.execute(
        '%%dispy --over "[1]" --into locked\n'
        "def guarded(x):\n    with lock:\n        return x\n"
    )
    assert out.ename == "MagicError", out.text
    _short(out.text)
    assert "guarded cannot be sent to the nodes: it uses lock (global" in out.text
    assert "%dispy local" not in out.text, out.text  # the nodes are fine


def test_a_progress_line_redrawn_with_carriage_returns_shows_as_it_ends(k):
    """A job drawing its own progress (tqdm, Keras: ``\\r`` and the line again)
    shows the line a terminal would show at the end, not every state."""
    out = k.run_ok(
        '%%dispy --over "[0]" --into drawn\n'
        "def drawn(x):\n    import sys\n"
        "    for i in range(0, 101, 5):\n"
        '        print(f"\\rtraining {i:3d}%", end="", file=sys.stderr)\n'
        '    print("\\rtraining done", file=sys.stderr)\n'
    )
    assert out.stderr == "[input 0] training done\n", out.text
    assert k.value("drawn.df.stderr[0]").count("\r") == 22  # the run keeps it all


def test_a_failing_setup_shows_its_traceback_not_a_nodes_hint(k):
    made = k.run_ok(
        "def load():\n    global table\n"
        "    table = open('missing.csv').read()\n"  # line 3
    )
    out = k.execute('%%dispy --over "[1]" --setup load\ndef f(x):\n    return x\n')
    assert out.ename == "MagicError", out.text
    assert "setup raised FileNotFoundError" in out.text
    assert f"Cell In[{made.execution_count}], line 3, in load" in out.text, out.text
    assert "%dispy local" not in out.text  # the nodes are fine: the setup is not
    assert "nodeserver/" not in out.text, out.text  # the node's own frames
    # Nor the %dispy local node's log lines repeating it ('nodeserver.session
    # WARNING computation f failed to start: ...', 'control channel read failed').
    assert "WARNING" not in out.text and "nodeserver." not in out.text, out.text


def test_running_a_helper_the_cell_defines_last_is_said(k):
    """The last function runs: when another function of the cell calls it, it is
    likely a helper written below the main one, so the cell says which runs."""
    out = k.run_ok(
        '%%dispy --over "[2]" --into which\n'
        "def simulate(x):\n    return helper(x) + 1\n\n"
        "def helper(x):\n    return x * 10\n"
    )
    assert k.value("which.results") == [20]  # helper ran, as documented
    assert (
        "dispynb: running helper, the cell's last function, which simulate calls; "
        "to run simulate: %%dispy simulate --over ..."
    ) in out.stderr, out.text
    quiet = k.run_ok('%%dispy --over "[2]"\ndef alone(x):\n    return x\n')
    assert "running" not in quiet.stderr, quiet.text


def test_help_shows_the_cell_magic_and_a_misspelt_option_is_named(k):
    helped = k.run_ok("%%dispy?")
    assert "%%dispy --over EXPR" in helped.pager, helped.pager[:500]
    assert "cell_dispy" not in helped.pager
    out = k.execute('%%dispy --ovr "range(3)"\ndef f(x):\n    return x\n')
    assert out.status == "error" and "UsageError" in out.stderr, out.text
    assert "unknown option --ovr; did you mean --over?" in out.text


def _short(text: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= 3, text
    assert "Traceback" not in text and "dispynb/" not in text, text


def test_unreachable_nodes_say_so_in_two_lines_with_the_fix(
    tmp_path: Path, held_port: PortHolder
):
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb")
        ports = (held_port(), held_port())  # nothing listens there
        out = k.execute(f"%dispy nodes 127.0.0.1:{ports[0]} 127.0.0.1:{ports[1]}")
        assert out.ename == "MagicError", out.text
        _short(out.text)
        assert "cannot connect to 127.0.0.1" in out.text
        assert "%dispy local" in out.text

        # Nodes that were attached, then went away: the run is not started, and
        # --into says why (no stale run from an earlier cell).
        with LocalCluster(cpus=1) as gone:
            secret = tmp_path / "secret"
            secret.write_text(gone.secret)
            secret.chmod(0o600)
            spec = gone.node_specs()[0]
            k.run_ok(f"%dispy nodes {spec} --secret-file {secret}")
        out = k.execute('%%dispy --over "[1]" --into late\ndef f(x):\n    return x\n')
        assert out.ename == "MagicError", out.text
        _short(out.text)
        assert "%dispy local" in out.text and "%dispy nodes" in out.text
        assert "not started" in k.value("repr(late)")

        # Local nodes that died: say so, and how to get new ones.
        k.run_ok("%dispy local --cpus 1")
        pids = node_pids(k)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert wait_gone(pids, 10) == []
        out = k.execute('%%dispy --over "[1]" --into late\ndef f(x):\n    return x\n')
        assert out.ename == "MagicError", out.text
        _short(out.text)
        assert "local nodes have exited" in out.text and "%dispy local" in out.text


def test_stop_while_nodes_do_not_answer_is_one_line(tmp_path: Path):
    """A host that accepts connections and never answers: ``%dispy nodes`` waits
    for its handshake, and the person presses Stop."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    with socket.socket() as silent, kernel(tmp_path) as k:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        port = silent.getsockname()[1]
        k.run_ok("%load_ext dispynb")
        msg_id = k.submit(f"%dispy nodes 127.0.0.1:{port} --secret-file {secret}")
        peer, _ = silent.accept()  # the magic is connecting now
        with peer:
            k.stop_button()
            out = k.collect(msg_id)
        assert out.ename == "MagicInterrupted", out.text
        _short(out.text)
        assert "Interrupted: %dispy nodes did not finish; no nodes" in out.text
        assert "no nodes" in k.run_ok("%dispy status").text


def test_stop_while_each_host_is_probed_ends_the_probes_and_keeps_the_nodes(
    tmp_path: Path,
):
    """``%dispy nodes a b`` probes each host on its own, in threads; two hosts
    accept and never answer (a slow link: dispy's MsgTimeout, so the probes would
    wait for them 15 s), and the person presses Stop: the probes end with the
    magic (their connections closed, no probe thread left), which says so in a
    line; the local nodes stay in use."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    with kernel(tmp_path) as k, socket.socket() as a, socket.socket() as b:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        k.run_ok(
            "import dispynb.config as c; c.MsgTimeout = c.DEFAULT_MSG_TIMEOUT * 12"
        )
        pids = node_pids(k)
        for silent in (a, b):
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            silent.settimeout(30)
        hosts = [f"127.0.0.1:{s.getsockname()[1]}" for s in (a, b)]
        msg_id = k.submit(f"%dispy nodes {' '.join(hosts)} --secret-file {secret}")
        peer_a, _ = a.accept()  # both probes are connecting now
        peer_b, _ = b.accept()
        with peer_a, peer_b:
            k.stop_button()
            out = k.collect(msg_id)
            # Before: both probes went on (for 15 s) after the magic returned.
            k.run_ok("import threading")
            alive = "[t.name for t in threading.enumerate()]"
            assert not [n for n in k.value(alive) if n.startswith("dispynb-probe")]
            for peer in (peer_a, peer_b):  # their connections are closed
                peer.settimeout(10)
                while peer.recv(1024):  # the probe's hello, then the end
                    pass
        assert out.ename == "MagicInterrupted", out.text
        _short(out.text)
        assert (
            f"Interrupted: %dispy nodes did not finish (stopped probing "
            f"{', '.join(hosts)}); local nodes" in out.text
        ), out.text
        ran = k.run_ok('%%dispy --over "range(2)" --into r\ndef f(x):\n    return x\n')
        assert k.value("r.results") == [0, 1], ran.text
        assert node_pids(k) == pids


def test_nodes_elsewhere_replace_the_notebooks_only_once_they_answer(
    tmp_path: Path, held_port: PortHolder
):
    """`%dispy nodes HOST` where nothing answers keeps the local nodes (it stopped
    them first, and the notebook was left with none); nodes that answer replace
    them: the old ones stop, and show as gone."""
    secret = tmp_path / "secret"
    with kernel(tmp_path) as k, LocalCluster(cpus=1) as elsewhere:
        secret.write_text(elsewhere.secret)
        secret.chmod(0o600)
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        pids = node_pids(k)
        first = k.value(f"[a for _, a, _ in {SESSION}.known_nodes()]")
        port = held_port()  # nothing listens there

        out = k.execute(f"%dispy nodes 127.0.0.1:{port} --secret-file {secret}")

        assert out.ename == "MagicError", out.text
        _short(out.text)
        assert f"cannot connect to 127.0.0.1:{port}" in out.text
        assert f"still in use: local nodes {first[0]}" in out.text
        ran = k.run_ok('%%dispy --over "range(2)" --into r\ndef f(x):\n    return x\n')
        assert k.value("r.results") == [0, 1], ran.text
        assert node_pids(k) == pids

        spec = elsewhere.node_specs()[0]
        k.run_ok(f"%dispy nodes {spec} --secret-file {secret}")
        status = k.run_ok("%dispy status").text
        state = {line.split()[1]: line.split()[2] for line in _node_lines(status)}
        assert state == {first[0]: "gone", spec: "idle"}, status
        assert wait_gone(pids, 10) == []


def test_a_failure_names_the_node_it_ran_on_among_nodes_of_one_address(tmp_path):
    """Two local nodes share 127.0.0.1: 'job 2 (input 1) on 127.0.0.1 failed' did
    not say which of them; the line names the node and its port, as the panel and
    %dispy status do."""
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --nodes 2 --cpus 1")
        out = k.execute(
            '%%dispy --over "range(2)" --into where --on local-1\n'
            "def where(i):\n"
            "    if i == 1:\n"
            "        raise ValueError(i)\n"
            "    return i"
        )
        session = "get_ipython().magics_manager.registry['DispyMagics'].session"
        port = k.value(f"{session}.local.addresses[1][1]")  # local-1's
    assert out.status == "ok", out.text
    found = re.search(r"input 1: where\(1\) on (.+) failed \(job \d+\):", out.stderr)
    assert found, out.stderr
    assert found.group(1) == f"local-1 (127.0.0.1:{port})", out.stderr


def test_replaced_and_dead_nodes_show_as_gone_not_idle(tmp_path: Path):
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        k.run_ok('%%dispy --over "range(2)"\ndef f(x):\n    return x\n')
        first = k.value(f"[a for _, a, _ in {SESSION}.known_nodes()]")
        k.run_ok("%dispy local --cpus 1")  # replaces the node
        second = k.value(f"[a for _, a, _ in {SESSION}.known_nodes()]")
        status = k.run_ok("%dispy status").text
        state = {line.split()[1]: line.split()[2] for line in _node_lines(status)}
        assert state == {first[0]: "gone", second[0]: "idle"}, status
        panel = k.run_ok(f"print(repr({SESSION}.panel))").text
        assert f"{first[0]} cpus=1" in panel and panel.count(" gone") == 1, panel

        # A node that died: gone too (its process exited).
        pids = node_pids(k)
        os.kill(pids[0], signal.SIGKILL)
        assert wait_gone(pids, 10) == []
        status = k.run_ok("%dispy status").text
        state = {line.split()[1]: line.split()[2] for line in _node_lines(status)}
        assert state[second[0]] == "gone", status


def test_new_nodes_say_which_unfinished_runs_they_stopped(tmp_path: Path):
    """``%dispy local`` again while a ``--nowait`` run works: the run's jobs are
    cancelled with the old nodes, and the cell says so (not only the new nodes)."""
    mark = tmp_path / "started"
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        k.run_ok(
            f'%%dispy --over "[{str(mark)!r}] * 2" --into long --nowait\n'
            "def long(mark):\n    import time\n"
            "    open(mark, 'w').close()\n    time.sleep(60)\n"
        )
        wait_until(mark.exists)
        out = k.run_ok("%dispy local --cpus 1")
        assert (
            "dispynb: run 'long' stopped, 2 cancelled, 1 of them while running "
            "(0 of 2 jobs done)"
        ) in out.stderr, out.text
        assert k.value("[j.status.name for j in long.jobs]") == [
            "Terminated",
            "Cancelled",
        ]
        quiet = k.run_ok("%dispy local --cpus 1")  # a finished run: nothing to say
        assert "stopped" not in quiet.text, quiet.text


def test_rerunning_a_nowait_cell_stops_the_run_it_started_before(tmp_path: Path):
    """Re-executing a ``--nowait --into long`` cell while its first run works: the
    first run's jobs are stopped (its CPU is for the new run) and the cell says so;
    another run (``other``) keeps working."""
    long_mark, other_mark = tmp_path / "long", tmp_path / "other"
    sleeper = "def {0}(mark):\n    import time\n    open(mark, 'w').close()\n"
    sleeper += "    time.sleep(60)\n"
    other_cell = f'%%dispy --over "[{str(other_mark)!r}]" --into other --nowait\n'
    long_cell = f'%%dispy --over "[{str(long_mark)!r}] * 2" --into long --nowait\n'
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
        k.run_ok(other_cell + sleeper.format("other"))
        wait_until(other_mark.exists)
        k.run_ok(long_cell + sleeper.format("long"))  # one job runs, one waits
        wait_until(long_mark.exists)
        k.run_ok("first = long")
        long_mark.unlink()
        out = k.run_ok(long_cell + sleeper.format("long"))
        assert (
            "dispynb: run 'long' stopped, 2 cancelled, 1 of them while running "
            "(0 of 2 jobs done)"
        ) in out.stderr, out.text
        assert "'other'" not in out.text, out.text
        assert k.value("[j.status.name for j in first.jobs]") == [
            "Terminated",
            "Cancelled",
        ]
        wait_until(long_mark.exists)  # the new run got the CPU
        assert k.value("long is not first and not other.done()") is True
        assert k.value("[j.status.name for j in other.jobs]") == ["Running"]


SESSION = "get_ipython().magics_manager.registry['DispyMagics'].session"


def _node_lines(status: str) -> list[str]:
    return [line for line in status.splitlines() if line.startswith("  local-")]


def test_running_and_busy_count_jobs_executing_not_jobs_sent(tmp_path: Path):
    """6 jobs on a node of 2 CPUs: never more than 2 running (or busy)."""
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
        k.run_ok(
            '%%dispy --over "[0.4] * 6" --into naps --nowait\n'
            "def nap(s):\n    import time\n    time.sleep(s)\n    return s\n"
        )
        samples = k.value(
            "(lambda time: [(naps.counts().running, "
            f"sum(r.busy for r in {SESSION}.panel.rows()), naps.done()) "
            "for _ in range(400) if naps.done() or time.sleep(0.01) is None])"
            "(__import__('time'))"
        )
        running = [r for r, _, _ in samples]
        busy = [b for _, b, _ in samples]
        assert max(running) == 2 and max(busy) <= 2, samples
        assert k.value("naps.wait(30) and naps.results") == [0.4] * 6


def test_a_run_whose_setup_takes_a_while_says_it_is_starting(k, tmp_path):
    """A cell whose nodes run its --setup for a while (a model loading) says that
    its run is starting, naming the setup; it showed nothing at all until the setup
    ended. A run that starts at once says nothing of it."""
    release = tmp_path / "release"
    k.run_ok(
        "def load_model():\n"
        "    import os, time\n"
        "    deadline = time.monotonic() + 60\n"
        f"    while not os.path.exists({str(release)!r}):\n"
        "        assert time.monotonic() < deadline\n"
        "        time.sleep(0.02)\n"
        "    return 0"
    )
    msg_id = k.submit(
        '%%dispy --over "range(3)" --setup load_model --into preds\n'
        "def predict(x):\n"
        "    return x * 2"
    )
    out = CellOutput()
    try:
        k.follow(msg_id, out, lambda o: "is starting" in o.stderr, timeout=30)
    finally:
        release.touch()
    out = k.collect(msg_id, out=out)
    assert out.status == "ok", out.text
    said = "dispynb: run 'preds' is starting: its nodes are running its setup, "
    assert out.stderr.count(said + "load_model, first\n") == 1, out.stderr
    assert k.value("preds.results") == [0, 2, 4]
    quick = k.run_ok(
        '%%dispy --over "range(3)" --into quick\ndef double(x):\n    return x * 2'
    )
    assert "is starting" not in quick.text, quick.text


def test_a_run_stopped_while_submitting_stays_in_status(k, tmp_path):
    """Stop while a cell still submits (its --over slow to give inputs, or a
    hundred thousand of them): the cell's name holds the run with what it sent,
    and %dispy status lists it as it lists a run stopped while waiting (it said
    '0 runs')."""
    fed = tmp_path / "fed"
    k.run_ok(
        "def feed():\n"
        "    import os, time\n"
        "    yield from range(3)\n"
        f"    open({str(fed)!r}, 'w').close()\n"
        "    deadline = time.monotonic() + 60\n"
        "    while time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
    )
    msg_id = k.submit(
        '%%dispy --over "feed()" --into cut --nowait\ndef f(i):\n    return i'
    )
    wait_until(fed.exists)
    k.stop_button()
    out = k.collect(msg_id)
    assert out.ename == "RunInterrupted", out.text
    assert "Interrupted while submitting: run 'cut' stopped" in out.text, out.text
    assert k.value("len(cut.jobs)") == 3
    status = k.run_ok("%dispy status").text
    assert "<Run 'cut' " in status, status


def test_a_name_the_notebook_lacks_too_says_to_run_its_cell_first(k):
    """Cells run out of order: a function using a global no cell has defined yet
    fails on the nodes with NameError; the cell says that the notebook lacks it
    too, and how to fix it (it showed the NameError alone)."""
    out = k.execute(
        '%%dispy --over "range(2)" --into scaled\n'
        "def scaled(p):\n"
        "    return later_scale * p"
    )
    assert out.ename == "MagicError", out.text
    assert "NameError: name 'later_scale' is not defined" in out.text, out.text
    said = (
        "dispynb: 'later_scale' is not defined in the notebook either: run the "
        "cell that defines it, then this one again"
    )
    assert out.text.count(said) == 1, out.text
    k.run_ok("later_scale = 10")
    again = k.run_ok(
        '%%dispy --over "range(2)" --into scaled\n'
        "def scaled(p):\n"
        "    return later_scale * p"
    )
    assert "is not defined" not in again.text, again.text
    assert k.value("scaled.results") == [0, 10]


def test_a_text_progress_bar_is_cell_output_not_an_error_box(k):
    """JupyterLab shows a cell's stderr in a pink box, as an error: the ``text`` bar
    (notebook 04) looked like one. In a kernel it goes to stdout."""
    out = k.run_ok(
        '%%dispy --over "range(4)" --into halves --progress text\n'
        "def halve(x):\n"
        "    return x / 2\n"
    )
    assert "[" + "#" * 30 + "] 4/4 done" in out.stdout, out.text
    assert "#" not in out.stderr, out.text
