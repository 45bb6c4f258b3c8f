"""A short, bounded fuzzing run of the pre-auth decoder (run in CI with the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dispynb.protocol.framing import encode_frames
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import Auth, pack_header
from tests.nodeproc import node_env

pytest.importorskip("atheris")

FUZZER = Path(__file__).with_name("fuzz_decoder.py")

#: Seconds of fuzzing: long enough to cover the decoder's paths, short for CI.
BUDGET = 20


def seeds() -> list[bytes]:
    """Valid openings for the corpus, so mutations start from real frames."""
    out = []
    for message in (ClientHandshake(b"s", "me").hello(), Auth(proof=bytes(32))):
        head, parts = encode_frames([pack_header(message.to_header())])
        out.append(b"\x07" + b"".join([head, *parts]))
    head, parts = encode_frames([b"\x91" * 50 + b"\xc0", b"payload"])
    out.append(b"\x00" + b"".join([head, *parts]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(BUDGET + 40)
def test_fuzz_pre_auth_decoding(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    done = subprocess.run(
        [
            sys.executable,
            str(FUZZER),
            f"-max_total_time={BUDGET}",
            "-seed=1",
            "-rss_limit_mb=2048",
            "-max_len=4096",
            str(corpus),
        ],
        cwd=tmp_path,  # crash files land here
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=BUDGET + 30,
    )
    tail = done.stderr[-3000:]
    assert done.returncode == 0, tail
    runs = [line for line in done.stderr.splitlines() if "Done" in line]
    assert runs, tail  # "Done N runs in S second(s)"
