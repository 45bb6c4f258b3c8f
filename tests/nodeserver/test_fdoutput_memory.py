"""What taking a worker's output files (`nodeserver.fdoutput.FdOutput.adopt`) costs
in memory: a worker is forked, and every page it writes of what it shares with its
parent is a copy of its own (issue 17 item 6, the nodes' PSS after W1).

Each case runs in a new interpreter that imports what a computation process runs
and freezes its objects, as the node does before it forks its zygote; children
forked from it count their pages mapped by them alone (``/proc/self/pagemap``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.jobs import WAIT

_COUNT = textwrap.dedent(
    """
    import gc, json, os, sys, tempfile, time
    import nodeserver.compute
    from nodeserver import fdoutput
    from nodeserver.rehearsal import rehearse

    # Present (bit 63) and mapped by this process alone (bit 56), from the byte
    # holding both: counted without making a Python object per page.
    ALONE = bytes(1 if i & 0x81 == 0x81 else 0 for i in range(256))

    def writable():
        spans = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if "w" in fields[1] and high - low < 1 << 30:
                    spans.append((low // 4096 * 8, (high - low) // 4096 * 8))
        return spans

    def alone(pagemap):
        count = 0
        for offset, size in writable():
            pagemap.seek(offset)
            count += pagemap.read(size)[7::8].translate(ALONE).count(1)
        return count

    rehearse()
    directory = tempfile.mkdtemp()
    gc.collect()
    gc.freeze()
    copied = {}
    for adopt in (False, True, False, True):
        files = fdoutput._anonymous_file(directory), fdoutput._anonymous_file(directory)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                before = alone(pagemap)
                before = alone(pagemap)  # the first count's own writes made
                if adopt:
                    fdoutput.FdOutput.adopt(*files)
                    time.sleep(0.2)  # its thread parked
                os.write(write_end, str(alone(pagemap) - before).encode())
            os._exit(0)
        os.close(write_end)
        pages = int(os.read(read_end, 64))
        os.waitpid(pid, 0)
        copied.setdefault(adopt, []).append(pages)
    print(json.dumps({"idle": min(copied[False]), "adopt": min(copied[True])}))
    """
)


def test_a_forked_worker_taking_its_output_files_copies_few_pages() -> None:
    """A forked process taking its files for output below Python wrote to 190-200
    pages (0.75 MiB) it shared with its parent, beyond what one that only waits
    writes: its output thread was a `threading.Thread` with Events (the threading
    module's state, its first runs), and it looked at every logger for stream
    handlers (each logger's page). About 105 now, over half of them the thread's
    own stack and state and the new streams its own output goes to."""
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.read(8)
    except OSError as exc:
        pytest.skip(f"/proc/self/pagemap cannot be read here: {exc}")
    done = subprocess.run(
        [sys.executable, "-c", _COUNT],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    copied = json.loads(done.stdout)
    assert copied["adopt"] - copied["idle"] < 150, copied
