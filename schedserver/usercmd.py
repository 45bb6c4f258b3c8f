"""``dispynb-scheduler user add|revoke|list``: manage a scheduler's users file.

An administrator's command: it imports the users file's code only, none of the
server's (it answers at once, and works where the server's dependencies would
not load)."""

from __future__ import annotations

import argparse
import contextlib
import os

from dispynb.errors import ConfigurationError
from schedserver.users import UsersFile, write_credential

__all__ = ["user_command"]


def user_command(argv: list[str]) -> int:
    """``dispynb-scheduler user add|revoke|list ...``: its exit status."""
    parser = argparse.ArgumentParser(
        prog="dispynb-scheduler user",
        description="Issue, revoke and list the users of a dispynb-scheduler; a "
        "running scheduler reads the users file as it changes.",
    )
    parser.add_argument(
        "action",
        choices=["add", "revoke", "list"],
        help="add NAME: issue a credential (the users file is made if it does not "
        "exist, and its directory, mode 0700, if only that is missing); revoke "
        "NAME: refuse it, ending its sessions and jobs; list: the "
        "users' names",
    )
    parser.add_argument("name", nargs="?", help="the user (add, revoke)")
    parser.add_argument(
        "--users", required=True, metavar="FILE", help="the scheduler's users file"
    )
    parser.add_argument(
        "--credential-file",
        "-o",
        default=None,
        metavar="FILE",
        help="where 'add' writes the credential (mode 0600; default NAME.credential)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="'add' replaces the credential file if it exists (by default it is "
        "refused: another user's credential, or any file, lost to a typo)",
    )
    args = parser.parse_args(argv)
    users = UsersFile(args.users)
    if args.action == "list":
        if not os.path.lexists(args.users):  # a typo: not "no users"
            raise ConfigurationError(
                f"no users file {args.users}: 'user add NAME --users "
                f"{args.users}' makes it"
            )
        for name in sorted(users.load()):
            print(name)
        return 0
    if not args.name:
        parser.error(f"'user {args.action}' needs a NAME")
    if args.action == "revoke":
        users.revoke(args.name)
        print(f"revoked {args.name}: a running scheduler ends its sessions")
        return 0
    path = args.credential_file or f"{args.name}.credential"
    where = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(where):  # checked first: the user added, its credential lost
        raise ConfigurationError(
            f"no directory {where} for the credential file {path}: check the "
            "--credential-file path, or make the directory first"
        )
    _check_credential_path(path, args.users, args.force)
    credential = users.add(args.name)
    write_credential(path, credential)
    print(
        f"user {args.name} added; credential in {path} (give it to the user: "
        f"SharedJobCluster(..., secret_file={path!r}))"
    )
    return 0


def _check_credential_path(path: str, users: str, force: bool) -> None:
    """Refuse, before the user is added (its credential would be lost, its name
    taken), to write a credential over a file: over the users file always (every
    user's token gone), over any other unless ``force``."""
    if not os.path.lexists(path):
        return
    with contextlib.suppress(OSError):
        if os.path.samefile(path, users):
            raise ConfigurationError(
                f"{path} is the users file (--users {users}): give the credential "
                "file another name with --credential-file"
            )
    if not force:
        raise ConfigurationError(
            f"{path} exists: not writing the credential over it (nobody added); "
            "give another --credential-file, or --force to replace it (an old "
            "credential of a user revoked before, say)"
        )
