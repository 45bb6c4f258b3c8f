"""The pages that say what ``./dev test`` installs as root name every Debian package
it installs: a newcomer running it as root (a container, a CI runner) should not find
sshd and SLURM installed on the machine without having been told."""

from __future__ import annotations

import re

from tests.docs.test_howto import ROOT

#: Pages that describe what ``./dev test`` installs, and the words naming each
#: package group ``./dev`` installs (one of them must be on the page).
PAGES = ["README.md", "docs/getting-started.md", "docs/howto/develop.md"]
NAMES = {
    "chromium": ("chromium",),
    "openssh-server": ("sshd", "openssh-server"),
    "slurmctld": ("SLURM", "slurmctld"),
}


def test_dev_installs_these_packages() -> None:
    dev = (ROOT / "dev").read_text(encoding="utf-8")
    installs = " ".join(re.findall(r"apt-get install[^\n]*\n?[^\n]*", dev))
    assert [p for p in NAMES if p not in installs] == [], installs


def test_pages_name_every_package_dev_test_installs_as_root() -> None:
    missing = []
    for page in PAGES:
        text = " ".join((ROOT / page).read_text(encoding="utf-8").split())
        said = re.search(r"as root[^.]*|installs Debian[^.]*", text, re.I)
        assert said, f"{page} does not say what ./dev test installs as root"
        described = text[max(0, said.start() - 200) : said.end() + 300]
        for package, words in NAMES.items():
            if not any(word.lower() in described.lower() for word in words):
                missing.append(f"{page}: {package}")
    assert not missing, missing
