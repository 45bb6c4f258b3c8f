"""A `Run`'s output: the progress bar and each ended job's remote stdout, stderr
and first traceback of each kind, written by whoever draws (the waiting thread, or
the callback thread in live mode)."""

from __future__ import annotations

import sys

from dispynb.job import DispyJob
from dispynb.jupyter.runstate import _FAILED, Writer, _RunState


class _RunOutput(_RunState):
    """Drawing the bar and writing the output of the jobs that ended."""

    def _pump(self, writer: Writer | None) -> None:
        """Draw the bar and write the output of jobs that ended since the last call."""
        self.bar.update(self.counts())
        while True:
            try:
                job = self._outputs.popleft()
            except IndexError:
                break
            if writer is not None:
                self.bar.before_output()
                self._write_job(job, writer)

    def _write_job(self, job: DispyJob, writer: Writer) -> None:
        label = f"[job {job.id}] "
        for stream in ("stdout", "stderr"):
            text = getattr(job, stream)
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            if text:
                writer(stream, _prefix_lines(text, label))
        if job.status in _FAILED and job.id not in self._cancelled:
            kind = _exception_kind(job.exception)
            seen = self._failure_kinds.setdefault(kind, [])
            seen.append(job)
            if len(seen) == 1:
                where = f" on {job.ip_addr}" if job.ip_addr else ""
                index = self._index.get(job.id)
                writer(
                    "stderr",
                    f"job {job.id} (input {index}){where} failed:\n"
                    f"{self.traceback(job).rstrip()}\n",
                )

    def _summary(self, writer: Writer) -> None:
        for kind, jobs in self._failure_kinds.items():
            if len(jobs) > 1:
                writer(
                    "stderr",
                    f"{kind}: {len(jobs)} jobs (first: job {jobs[0].id}); "
                    f"see {self.name}.failures or .df.exception\n",
                )


def _print_writer(stream: str, text: str) -> None:
    target = sys.stdout if stream == "stdout" else sys.stderr
    target.write(text)
    target.flush()


def _prefix_lines(text: str, label: str) -> str:
    """``text`` with ``label`` before each of its lines, ending with a newline."""
    lines = text.splitlines()
    return "".join(f"{label}{line}\n" for line in lines)


def _exception_kind(exception: str | None) -> str:
    """``'ValueError'`` from a traceback's last line; the whole line if no colon."""
    if not exception:
        return "failure"
    lines = [line for line in exception.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else exception
    return last.split(":", 1)[0].strip() or "failure"
