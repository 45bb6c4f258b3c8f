"""The secret-strength examples of docs/security.md are what
``dispynb.secret.estimate_bits`` gives."""

from __future__ import annotations

import re
import secrets
import statistics

from dispynb.secret import estimate_bits
from tests.docs.conftest import DOCS

#: Draws of a random secret whose median the page gives.
DRAWS = 400


def _examples() -> str:
    text = re.sub(r"\s+", " ", (DOCS / "security.md").read_text(encoding="utf-8"))
    match = re.search(r"Examples: (.*?)\. A single", text)
    assert match, "no 'Examples:' sentence on security.md"
    return match.group(1)


def test_fixed_examples_score_as_the_page_says() -> None:
    found = re.findall(r"`([^`]+)` (\d+)", _examples())
    assert len(found) >= 3
    for secret, bits in found:
        assert round(estimate_bits(secret.encode())) == int(bits), secret


def test_random_examples_score_about_what_the_page_says() -> None:
    """A draw varies (a repeated or next character scores 1 bit): the page gives
    the typical score, the median of many draws."""
    text = _examples()
    hex_bits = int(
        re.search(r"32 random hex digits \([^)]*\) (?:about )?(\d+)", text)[1]
    )
    token_bits = int(re.search(r"`dispynb secret` \([^)]*\) about (\d+)", text)[1])
    hex_median = statistics.median(
        estimate_bits(secrets.token_hex(16).encode()) for _ in range(DRAWS)
    )
    token_median = statistics.median(
        estimate_bits(secrets.token_urlsafe(32).encode()) for _ in range(DRAWS)
    )
    assert abs(hex_bits - hex_median) <= 3, hex_median
    assert abs(token_bits - token_median) <= 5, token_median
