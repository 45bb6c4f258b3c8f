"""Dask's "Sending large graph" advice, which dispynb's jobs do not take, is ignored
for a large job's submit only: in the thread submitting it, and without touching
what other threads do with warnings meanwhile."""

from __future__ import annotations

import threading
import warnings

import pytest

pytest.importorskip("distributed")

from dispynb.backends._daskjobs import _no_large_graph_warning

pytestmark = pytest.mark.timeout(30)

#: Bytes of arguments over Dask's large-graph threshold (10 MB by default).
LARGE = 12 << 20


def _warn(size: str) -> None:
    warnings.warn(f"Sending large graph of size {size}.", UserWarning, stacklevel=1)


def test_a_large_submit_ignores_its_own_advice_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one thread submits a large job, another thread's own large-graph
    warning shows (its own Dask client's), and a filter that thread adds stays
    after the submit: ``catch_warnings`` ignored the one and dropped the other."""
    shown: list[str] = []

    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        shown.append(str(message))

    inside, other_done = threading.Event(), threading.Event()

    def submitter() -> None:
        with _no_large_graph_warning(LARGE):
            inside.set()
            assert other_done.wait(10)
            _warn("12.00 MiB")  # what client.submit says here: dispynb's job

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        thread = threading.Thread(target=submitter)
        thread.start()
        try:
            assert inside.wait(10)
            _warn("99.00 MiB")  # this thread's own submit of a large graph
            warnings.filterwarnings("error", "a filter added meanwhile")
            other_done.set()
        finally:
            other_done.set()
            thread.join(10)
        assert shown == ["Sending large graph of size 99.00 MiB."]
        with pytest.raises(UserWarning, match="added meanwhile"):
            warnings.warn("a filter added meanwhile", UserWarning, stacklevel=1)
        _warn("12.00 MiB")  # after the submit, shown again
        assert shown[-1] == "Sending large graph of size 12.00 MiB."
