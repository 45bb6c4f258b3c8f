"""Tests of `dispynb.joblib_backend`: joblib's ``Parallel`` and scikit-learn's
``n_jobs`` on dispynb nodes, the way users type them."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import psutil
import pytest

joblib = pytest.importorskip("joblib")

import dispynb.joblib_backend as backend  # noqa: E402  (registers "dispynb")
from dispynb import Executor, LocalCluster  # noqa: E402
from dispynb.errors import NoNodesError, RemoteError  # noqa: E402
from tests.api.executorwork import hold  # noqa: E402
from tests.jobs import WAIT, wait_for_path, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def pid_of_square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def fail_once_running(marker: str) -> None:
    """Raise once the call of `hold` writing ``marker`` runs."""
    wait_for_path(marker)
    raise KeyError(marker)


def _run_script(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (nothing of this test's imports);
    return its output lines."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_import_dispynb_never_imports_joblib():
    code = (
        "import sys, dispynb, dispynb.executor, dispynb.futures\n"
        "dispynb.Executor\n"
        "print('joblib' in sys.modules, 'sklearn' in sys.modules)"
    )
    assert _run_script(code) == ["False False"]


def test_backend_dispynb_works_after_a_plain_import_dispynb():
    """``import dispynb`` then joblib, as users type it: ``backend="dispynb"`` runs
    on dispynb nodes; until then neither joblib nor the backend is loaded."""
    code = (
        "import sys, dispynb\n"
        "print(sorted({'joblib', 'dispynb.joblib_backend'} & set(sys.modules)))\n"
        "import joblib\n"
        "print('dispynb.joblib_backend' in sys.modules)\n"
        "with joblib.parallel_config(backend='dispynb'):\n"
        "    calls = (joblib.delayed(abs)(-x) for x in range(4))\n"
        "    print(joblib.Parallel(n_jobs=2)(calls))\n"
        "    import dispynb.joblib_backend as b\n"
        "    print(b.default_executor().cluster.job_counts['submitted'] > 0)\n"
        "b.shutdown()\n"
    )
    assert _run_script(code) == ["[]", "False", "[0, 1, 2, 3]", "True"]


def test_backend_dispynb_is_known_when_joblib_was_imported_first():
    code = (
        "import sys, joblib, dispynb\n"
        "print('dispynb.joblib_backend' in sys.modules)\n"
        "with joblib.parallel_backend('dispynb'):\n"
        "    print(type(joblib.parallel.get_active_backend()[0]).__name__)\n"
        "p = joblib.Parallel(n_jobs=2, backend='dispynb')\n"
        "print(type(p._backend).__name__)\n"
    )
    assert _run_script(code) == ["False", "DispynbBackend", "DispynbBackend"]


LEGACY_LOADER = """
import importlib.util, sys, types


class OldLoader:
    # An import hook's loader of the old protocol: load_module, no exec_module.
    def __init__(self, spec):
        self.path = spec.origin

    def load_module(self, name):
        module = types.ModuleType(name)
        module.__file__, module.__package__ = self.path, "joblib"
        sys.modules[name] = module
        with open(self.path) as file:
            exec(compile(file.read(), self.path, "exec"), module.__dict__)
        return module


class Hook:
    def find_spec(self, name, path=None, target=None):
        if name != "joblib.parallel":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        return importlib.util.spec_from_loader(name, OldLoader(spec))


sys.meta_path.insert(0, Hook())
import dispynb, joblib
with joblib.parallel_config(backend="dispynb"):
    print(type(joblib.parallel.get_active_backend()[0]).__name__)
module = sys.modules["joblib.parallel"]
print(type(module.__loader__).__name__, type(module.__spec__.loader).__name__)
"""


def test_backend_dispynb_is_known_when_an_import_hook_loads_joblib():
    """An import hook whose loader has only ``load_module`` (the protocol before
    ``exec_module``) loading ``joblib.parallel``: the backend name is known all
    the same, and the module keeps the hook's loader."""
    assert _run_script(LEGACY_LOADER) == ["DispynbBackend", "OldLoader OldLoader"]


def test_a_backend_that_cannot_load_says_what_to_do():
    code = (
        "import sys, dispynb, joblib\n"
        "sys.modules['dispynb.joblib_backend'] = None  # as if it failed to import\n"
        "try:\n"
        "    joblib.parallel_config(backend='dispynb')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    (message,) = _run_script(code)
    assert message.startswith("joblib's backend 'dispynb' cannot load (")
    assert "pip install 'joblib>=1.3'" in message


def test_parallel_and_cross_val_score_on_the_default_backend():
    """``parallel_config(backend="dispynb")`` as typed: local nodes with every CPU;
    scikit-learn's scores equal those of joblib's default backend."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500)
    try:
        with joblib.parallel_config(backend="dispynb"):
            assert joblib.effective_n_jobs(-1) == (os.cpu_count() or 1)
            results = joblib.Parallel(n_jobs=-1)(
                joblib.delayed(pid_of_square)(x) for x in range(20)
            )
            cluster = backend.default_executor().cluster
            before = cluster.job_counts["submitted"]
            ours = cross_val_score(model, features, labels, cv=5, n_jobs=-1)
            assert cluster.job_counts["submitted"] > before  # it ran on dispynb
        nodes = {proc.pid for proc in backend.default_executor()._local._procs}
        assert [value for value, _pid in results] == [x * x for x in range(20)]
        # Each call ran in a worker process under one of the local nodes.
        for _value, pid in results:
            assert {p.pid for p in psutil.Process(pid).parents()} & nodes
        assert [float(s) for s in ours] == _default_backend_scores()
    finally:
        backend.shutdown()


def _default_backend_scores() -> list[float]:
    """The same scores from joblib's default backend (loky), in a process of their
    own: loky keeps its workers and resource trackers until that process exits."""
    code = (
        "import json\n"
        "from sklearn.datasets import load_iris\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "from sklearn.model_selection import cross_val_score\n"
        "X, y = load_iris(return_X_y=True)\n"
        "model = LogisticRegression(max_iter=500)\n"
        "scores = cross_val_score(model, X, y, cv=5, n_jobs=-1)\n"
        "print(json.dumps([float(s) for s in scores]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


def test_given_executor_exceptions_and_n_jobs(local: LocalCluster):
    with Executor(nodes=local) as executor:
        with joblib.parallel_config(backend="dispynb", executor=executor):
            assert joblib.effective_n_jobs(-1) == executor.cpus == 2
            assert joblib.effective_n_jobs(-2) == 1
            squares = joblib.Parallel(n_jobs=2, batch_size=3)(
                joblib.delayed(pid_of_square)(x) for x in range(10)
            )
            assert [value for value, _pid in squares] == [x * x for x in range(10)]
            with pytest.raises(ValueError, match="bad input 7"):
                joblib.Parallel(n_jobs=-1)(
                    joblib.delayed(fail_on)(x, 7) for x in range(40)
                )
            # The backend stays usable after a failure.
            assert joblib.Parallel(n_jobs=-1)(
                joblib.delayed(fail_on)(x, -1) for x in range(5)
            ) == list(range(5))
            # Parallel's timeout terminates the batches still running.
            # The batches the failure above stopped end first (asynchronously).
            wait_until(lambda: not executor._live_jobs())
            counts = executor.cluster.job_counts

            def stopped() -> int:
                # A batch that had not started by the timeout (a loaded machine)
                # is cancelled rather than terminated: stopped either way.
                return counts["Terminated"] + counts["Cancelled"]

            before, finished = stopped(), counts["Finished"]
            with pytest.raises(multiprocessing.TimeoutError):
                joblib.Parallel(n_jobs=-1, timeout=0.5)(
                    joblib.delayed(time.sleep)(60) for _ in range(2)
                )
            # Both end within WAIT (10 s), not after their 60 s.
            wait_until(lambda: stopped() == before + 2)
            assert counts["Finished"] == finished
            with pytest.raises(ValueError, match="n_jobs == 0"):
                joblib.Parallel(n_jobs=0)(joblib.delayed(abs)(1) for _ in range(2))
        assert executor.cluster.job_counts["Finished"] >= 1


def test_a_failing_call_terminates_the_running_batches_at_once(local, tmp_path):
    """As loky, which kills its workers: a call that raises stops the other batches
    (running, or sent ahead to a busy worker), and Parallel raises at once, not
    when the running batches end."""
    release = str(tmp_path / "release")  # never created: the holds end at WAIT
    first = str(tmp_path / "first")
    with Executor(nodes=local) as executor:
        # Quick calls first: the node then sends jobs ahead to its busy workers.
        assert list(executor.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        calls = [
            joblib.delayed(hold)(first, release),
            joblib.delayed(fail_once_running)(first),
            joblib.delayed(hold)(str(tmp_path / "third"), release),
            joblib.delayed(hold)(str(tmp_path / "fourth"), release),
        ]
        with joblib.parallel_config(backend="dispynb", executor=executor):
            with pytest.raises(KeyError, match="first"):
                joblib.Parallel(n_jobs=2, batch_size=1)(calls)
            assert sorted(tmp_path.glob("*.ended")) == []  # terminated, not waited
            wait_until(lambda: executor.cluster.job_counts["Terminated"] >= 1)
            assert joblib.Parallel(n_jobs=2)(
                joblib.delayed(abs)(-x) for x in range(4)
            ) == list(range(4))


def test_n_jobs_on_an_executor_without_nodes_is_a_clear_error(local: LocalCluster):
    with Executor(nodes=local) as executor:
        host, port = local.addresses[0]
        assert executor.cluster.close_node(f"{host}:{port}") == 0
        wait_until(lambda: executor.cpus == 0)
        with (
            joblib.parallel_config(
                backend="dispynb", executor=executor, wait_for_nodes=0.2
            ),
            pytest.raises(NoNodesError, match=r"no node after 0\.2 s"),
        ):
            joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-1) for _ in range(2))


def thread_limits(_: int) -> tuple[int, str | None]:
    """The BLAS thread pool's size in this batch, and its OMP_NUM_THREADS."""
    import numpy  # noqa: F401  (loads the BLAS library)
    from threadpoolctl import threadpool_info

    sizes = {pool["num_threads"] for pool in threadpool_info()}
    assert len(sizes) == 1, threadpool_info()
    return sizes.pop(), os.environ.get("OMP_NUM_THREADS")


def test_thread_pools_share_the_cpus_among_the_batches(local: LocalCluster):
    """As loky's workers: each batch's OpenMP and BLAS threads are the CPUs divided
    by n_jobs, or ``inner_max_num_threads`` (before, each batch of n_jobs=-1 used
    every CPU: CPUs squared threads)."""
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("numpy")
    with (
        Executor(nodes=local) as executor,
        joblib.parallel_config(backend="dispynb", executor=executor),
    ):
        assert (
            joblib.Parallel(n_jobs=2)(
                joblib.delayed(thread_limits)(i) for i in range(4)
            )
            == [(1, "1")] * 4
        )
        with joblib.parallel_config(
            backend="dispynb", executor=executor, inner_max_num_threads=2
        ):
            assert (
                joblib.Parallel(n_jobs=2)(
                    joblib.delayed(thread_limits)(i) for i in range(4)
                )
                == [(2, "2")] * 4
            )
        # A plain call afterwards: the worker's environment is as it was.
        assert executor.submit(os.environ.get, "OMP_NUM_THREADS").result(WAIT) is None


def test_a_failing_calls_traceback_shows_its_source_lines(local: LocalCluster):
    """As loky's: the remote traceback names this file and shows the line that
    raised (the node sees code sent by value as ``<dynamic-code>``, no source)."""
    with (
        Executor(nodes=local) as executor,
        joblib.parallel_config(backend="dispynb", executor=executor),
        pytest.raises(ValueError, match="bad input 3") as info,
    ):
        joblib.Parallel(n_jobs=2)(joblib.delayed(fail_on)(x, 3) for x in range(4))
    text = info.value.__cause__.traceback
    assert "<dynamic-code>" not in text, text
    assert f'File "{__file__}", line ' in text, text
    assert '    raise ValueError(f"bad input {x}")\n' in text, text


def generator_on(x: int, bad: int) -> object:
    return (i for i in range(x)) if x == bad else x


def test_a_value_that_cannot_be_sent_back_names_its_call_in_the_batch(
    local: LocalCluster,
):
    """The runner's view named it: 'the value returned by the call has [1], a
    'generator'', the call being the batch and [1] its place in it."""
    with (
        Executor(nodes=local) as executor,
        joblib.parallel_config(backend="dispynb", executor=executor),
        pytest.raises(RemoteError) as info,
    ):
        joblib.Parallel(n_jobs=2, batch_size=2)(
            joblib.delayed(generator_on)(x, 1) for x in range(4)
        )
    assert (
        "the value returned by call 2 of its joblib batch is a 'generator' that "
        "cannot be pickled"
    ) in str(info.value)
