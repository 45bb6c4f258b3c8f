"""Coverage-guided fuzzing (atheris) of what an unauthenticated peer reaches first.

Each input is split into chunks (its first byte picks the chunk size) and fed to a
pre-auth `FrameDecoder`; every frame it yields is decoded as a header with the pre-auth
limits, turned into a message, and given to a node's handshake. Anything but a
`DispynbError` is a bug (atheris then saves the input and exits non-zero).

Run: ``python tests/fuzz/fuzz_decoder.py -max_total_time=20 [corpus_dir]``
(``tests/fuzz/test_fuzz.py`` does, with a seed corpus of valid frames).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from dispynb.defaults import PRE_AUTH_MAX_FRAME
    from dispynb.errors import DispynbError
    from dispynb.protocol.framing import FrameDecoder
    from dispynb.protocol.handshake import NodeHandshake
    from dispynb.protocol.messages import WireMessage, unpack_header


def one_input(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 64 + 1
    decoder = FrameDecoder(PRE_AUTH_MAX_FRAME, chunk=256)
    node = NodeHandshake(b"fuzz-secret")
    try:
        for start in range(1, len(data), step):
            for _prefix, buffers, _signed, _mac in decoder.feed(
                data[start : start + step]
            ):
                message = WireMessage.from_header(
                    unpack_header(buffers[0], trusted=False)
                )
                if len(buffers) == 1:
                    node.on_hello(message)
    except DispynbError:
        return
    assert decoder.expected <= PRE_AUTH_MAX_FRAME + 8


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
