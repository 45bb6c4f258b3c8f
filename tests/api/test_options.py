"""Tests of JobCluster keyword arguments: names, aliases, validation, normalisation."""

from __future__ import annotations

import functools
import io
import logging
import os
import stat
import subprocess
import sys
import types

import pytest

from dispynb.defaults import SECRET_ENV, SECRET_FILE_ENV
from dispynb.errors import ConfigurationError
from dispynb.log import default_level, set_level
from dispynb.options import ClusterOptions

SECRET = "correct horse battery staple"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)


def compute(n):
    return n * 2


def status_one(job):
    pass


def status_three(status, node, job):
    pass


class Handler:
    def job_status(self, job):
        pass

    def cluster_status(self, status, node, job):
        pass

    def __call__(self, job):
        pass


def build(**kwargs):
    return ClusterOptions.from_kwargs(compute, **kwargs)


def make_file(tmp_path, name: str, content: str = "x") -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


# computation


def test_options_defaults_match_dispy():
    options = build()
    assert options.computation is compute
    assert options.nodes is None
    assert options.depends == []
    assert options.cleanup is True
    assert options.reentrant is False
    assert options.secret is None
    assert options.max_message_size > 0


@pytest.mark.parametrize(
    "computation",
    [
        compute,
        lambda n: n,
        functools.partial(divmod, 7),
        Handler(),
        Handler().job_status,
    ],
    ids=["function", "lambda", "partial", "callable-instance", "bound-method"],
)
def test_options_callable_computation_kept_as_is(computation):
    assert ClusterOptions.from_kwargs(computation).computation is computation


def test_options_program_path_resolved_to_absolute(tmp_path, monkeypatch):
    make_file(tmp_path, "prog.py", "print('hi')\n")
    monkeypatch.chdir(tmp_path)
    options = ClusterOptions.from_kwargs("prog.py")
    assert options.computation == str(tmp_path / "prog.py")


def test_options_program_name_found_on_path(tmp_path, monkeypatch):
    program = tmp_path / "my-program"
    program.write_text("#!/bin/sh\n")
    program.chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ClusterOptions.from_kwargs("my-program").computation == str(program)


def test_options_missing_program_raises_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match="'no-such-program' was not found"):
        ClusterOptions.from_kwargs("no-such-program")


@pytest.mark.parametrize("computation", [42, None, ["prog"]])
def test_options_computation_of_wrong_type_raises_configuration_error(computation):
    with pytest.raises(ConfigurationError, match="computation must be a callable"):
        ClusterOptions.from_kwargs(computation)


async def _async_compute(n: int) -> int:
    return n


async def _async_lines(n: int):  # type: ignore[no-untyped-def]
    yield n


class _AsyncCallable:
    async def __call__(self, n: int) -> int:
        return n


@pytest.mark.parametrize(
    "computation",
    [
        _async_compute,
        functools.partial(_async_compute, 1),
        _async_lines,
        _AsyncCallable(),
    ],
)
def test_an_async_computation_is_refused_saying_what_to_do(computation):
    """Nodes call a computation as a plain function, as dispy's do: an async one
    gave them a coroutine, and each job ended Terminated with "cannot pickle
    'coroutine' object". Refused at once, naming the fix."""
    from dispynb import JobCluster

    with pytest.raises(ConfigurationError, match=r"async function.*asyncio\.run"):
        JobCluster(computation, nodes=["127.0.0.1:1"])
    with pytest.raises(ConfigurationError, match=r"setup .* is an async function"):
        ClusterOptions.from_kwargs(len, setup=computation)
    with pytest.raises(ConfigurationError, match=r"cleanup .* is an async function"):
        ClusterOptions.from_kwargs(len, cleanup=computation)


# names and aliases


def test_options_unknown_keyword_raises_type_error_with_suggestion():
    with pytest.raises(TypeError, match="did you mean 'pulse_interval'"):
        build(pulse_intervall=5)


def test_options_several_unknown_keywords_all_named():
    with pytest.raises(TypeError, match="arguments") as info:
        build(sekret="x", zzz=1)
    message = str(info.value)
    assert "'sekret' (did you mean 'secret'" in message
    assert "'zzz'" in message


def test_options_callback_alias_sets_job_status_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dispynb.options"):
        options = build(callback=status_one)
    assert options.job_status is status_one
    assert "'callback' is deprecated" in caplog.text


def test_options_callback_and_job_status_both_given_raise():
    with pytest.raises(ConfigurationError, match="give only 'job_status'"):
        build(callback=status_one, job_status=status_one)


def test_options_callback_none_with_job_status_accepted():
    assert build(callback=None, job_status=status_one).job_status is status_one


@pytest.mark.parametrize(
    ("old", "new"), [("ip_addr", "host"), ("ext_ip_addr", "ext_host")]
)
def test_options_address_alias_sets_new_name_with_warning(caplog, old, new):
    with caplog.at_level(logging.WARNING, logger="dispynb.options"):
        options = build(**{old: "127.0.0.1"})
    assert getattr(options, new) == "127.0.0.1"
    assert f"{old!r} is deprecated" in caplog.text


def test_options_address_alias_and_new_name_both_given_raise():
    with pytest.raises(ConfigurationError, match="deprecated alias 'ip_addr'"):
        build(ip_addr="127.0.0.1", host="127.0.0.1")


# callbacks


@pytest.mark.parametrize(
    "callback",
    [
        status_one,
        lambda job: None,
        lambda *args: None,
        lambda job, extra=None: None,
        Handler().job_status,
        Handler(),
        functools.partial(status_three, "status", "node"),
        print,
    ],
    ids=[
        "function",
        "lambda",
        "varargs",
        "default",
        "bound-method",
        "instance",
        "partial",
        "builtin",
    ],
)
def test_options_job_status_with_one_parameter_accepted(callback):
    assert build(job_status=callback).job_status is callback


@pytest.mark.parametrize(
    "callback",
    [lambda: None, status_three, lambda job, *, key: None, Handler.job_status],
    ids=["none", "three", "required-keyword-only", "unbound-method"],
)
def test_options_job_status_with_wrong_signature_raises(callback):
    with pytest.raises(ConfigurationError, match=r"def job_status\(job\)"):
        build(job_status=callback)


def test_options_job_status_not_callable_raises():
    with pytest.raises(ConfigurationError, match="job_status must be a function"):
        build(job_status="status_one")


@pytest.mark.parametrize(
    "callback",
    [status_three, Handler().cluster_status, lambda *args: None],
    ids=["function", "bound-method", "varargs"],
)
def test_options_cluster_status_with_three_parameters_accepted(callback):
    assert build(cluster_status=callback).cluster_status is callback


@pytest.mark.parametrize(
    "callback", [status_one, Handler.cluster_status], ids=["one", "unbound-method"]
)
def test_options_cluster_status_with_wrong_signature_raises(callback):
    with pytest.raises(
        ConfigurationError, match=r"three positional arguments.*status, node, job"
    ):
        build(cluster_status=callback)


def test_options_setup_not_callable_raises():
    with pytest.raises(ConfigurationError, match="setup must be a function"):
        build(setup="setup")


@pytest.mark.parametrize("cleanup", [True, False, status_one])
def test_options_cleanup_bool_or_callable_accepted(cleanup):
    assert build(cleanup=cleanup).cleanup is cleanup


def test_options_cleanup_other_value_raises():
    with pytest.raises(ConfigurationError, match="cleanup must be True"):
        build(cleanup="yes")


# numbers


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ping_interval", 1),
        ("ping_interval", 1000),
        ("pulse_interval", 0.1),
        ("pulse_interval", 60),
        ("poll_interval", 5),
        ("poll_interval", 1000.0),
        ("pulse_interval", "10"),  # dispy float()s it
    ],
)
def test_options_interval_within_range_stored_as_float(name, value):
    stored = getattr(build(**{name: value}), name)
    assert stored == float(value)
    assert isinstance(stored, float)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ping_interval", 0.5),
        ("ping_interval", 1001),
        ("pulse_interval", 0.05),
        ("poll_interval", 4),
        ("poll_interval", True),
        ("pulse_interval", "ten"),
        ("ping_interval", "0.5"),
    ],
)
def test_options_interval_out_of_range_raises(name, value):
    with pytest.raises(ConfigurationError, match=f"{name} must be between"):
        build(**{name: value})


@pytest.mark.parametrize("port", [0, 65536, "9700", True])
def test_options_bad_dispy_port_raises(port):
    with pytest.raises(ConfigurationError, match="dispy_port"):
        build(dispy_port=port)


@pytest.mark.parametrize("size", [1024, -1, "1G", None])
def test_options_bad_max_message_size_raises(size):
    with pytest.raises(ConfigurationError, match="max_message_size"):
        build(max_message_size=size)


@pytest.mark.parametrize(
    ("given", "level"),
    [(None, None), (logging.DEBUG, 10), ("debug", 10), ("WARNING", 30), (5, 5)],
)
def test_options_loglevel_int_or_name_normalised(given, level):
    assert build(loglevel=given).loglevel == level


@pytest.mark.parametrize("level", ["loud", -1, True, 1.5])
def test_options_bad_loglevel_raises(level):
    with pytest.raises(ConfigurationError, match="loglevel"):
        build(loglevel=level)


# paths and addresses


@pytest.mark.parametrize(
    ("given", "stored"),
    [(None, None), ("", None), ("job", "job"), ("a//b/./c/", "a/b/c"), ("a/../b", "b")],
)
def test_options_relative_dest_path_normalised(given, stored):
    assert build(dest_path=given).dest_path == stored


@pytest.mark.parametrize("path", ["/tmp/job", "/", "C:\\jobs"])
def test_options_absolute_dest_path_raises_with_hint(path):
    with pytest.raises(ConfigurationError, match="give a path relative"):
        build(dest_path=path)


@pytest.mark.parametrize("path", ["..", "../up", "a/../../up"])
def test_options_dest_path_leaving_directory_raises(path):
    with pytest.raises(ConfigurationError, match=r"without '\.\.'"):
        build(dest_path=path)


@pytest.mark.parametrize("host", ["127.0.0.1", ["127.0.0.1", "::1"], None])
def test_options_host_str_or_list_accepted(host):
    assert build(host=host).host == host


def test_options_host_tuple_copied_to_list():
    assert build(ext_host=("a", "b")).ext_host == ["a", "b"]


@pytest.mark.parametrize("host", [42, "", ["ok", 1]])
def test_options_bad_host_raises(host):
    with pytest.raises(ConfigurationError, match="host must be a host name"):
        build(host=host)


def test_options_tls_files_existing_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_file(tmp_path, "key.pem")
    make_file(tmp_path, "cert.pem")
    make_file(tmp_path, "ca.pem")
    options = build(keyfile="key.pem", certfile="cert.pem", cafile="ca.pem")
    assert options.keyfile == str(tmp_path / "key.pem")
    assert options.certfile == str(tmp_path / "cert.pem")
    assert options.cafile == str(tmp_path / "ca.pem")


@pytest.mark.parametrize("name", ["keyfile", "certfile", "cafile"])
def test_options_missing_tls_file_raises(tmp_path, name):
    path = str(tmp_path / "absent.pem")
    kwargs = {name: path}
    if name == "keyfile":
        kwargs["certfile"] = make_file(tmp_path, "cert.pem")
    with pytest.raises(ConfigurationError, match=f"{name} .* does not exist"):
        build(**kwargs)


def test_options_keyfile_without_certfile_raises(tmp_path):
    with pytest.raises(ConfigurationError, match="without certfile"):
        build(keyfile=make_file(tmp_path, "key.pem"))


def test_options_certfile_alone_accepted(tmp_path):
    path = make_file(tmp_path, "both.pem")
    options = build(certfile=path)
    assert options.certfile == path
    assert options.keyfile is None


# depends and nodes


def test_options_depends_list_copied_not_mutated(tmp_path):
    given = [make_file(tmp_path, "data.txt"), compute]
    snapshot = list(given)
    options = build(depends=given)
    options.depends.append(status_one)
    assert given == snapshot
    assert options.depends[:2] == snapshot
    assert options.depends is not given


@pytest.mark.parametrize("item", [compute, os, Handler()], ids=["fn", "module", "obj"])
def test_options_depends_single_item_wrapped(item):
    assert build(depends=item).depends == [item]


def test_options_depends_none_gives_new_empty_list():
    first, second = build(depends=None), build()
    assert first.depends == []
    first.depends.append(1)
    assert second.depends == []


def test_options_depends_missing_file_raises(tmp_path):
    path = str(tmp_path / "absent.txt")
    with pytest.raises(ConfigurationError, match="not an existing file"):
        build(depends=[path])


def test_options_nodes_kept_as_given():
    nodes = ["192.168.1.*", "node2"]
    assert build(nodes=nodes).nodes is nodes


# secret


def test_options_secret_str_resolved_to_bytes_and_hidden_from_repr():
    options = build(secret=SECRET)
    assert options.secret == SECRET.encode()
    assert SECRET not in repr(options)
    assert "secret=" not in repr(options)


def test_options_secret_file_resolved_and_hidden_from_repr(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    options = build(secret_file=str(path))
    assert options.secret == SECRET.encode()
    assert SECRET not in repr(options)


def test_options_secret_from_env(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert build().secret == SECRET.encode()


def test_options_secret_file_loose_permissions_raise_without_secret(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600") as info:
        build(secret_file=str(path))
    assert SECRET not in str(info.value)


def test_options_invalid_value_error_does_not_reveal_secret():
    with pytest.raises(ConfigurationError) as info:
        build(secret=SECRET, ping_interval=0)
    assert SECRET not in str(info.value)


#: A newcomer's two ways to give the function wrongly: its result, its name.
MISTAKES = """\
import dispynb


def compute(n):
    return n * n


for computation in (compute(3), "compute"):
    try:
        dispynb.JobCluster(computation)
    except dispynb.errors.ConfigurationError as exc:
        print(exc)
"""


def test_a_function_called_or_named_instead_of_given_is_said_so(tmp_path):
    """``JobCluster(compute(3))`` said 'got a int'; ``JobCluster("compute")``
    looked for a program named compute on PATH. Each now says what to write."""
    (tmp_path / "script.py").write_text(MISTAKES)
    done = subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    called, named = done.stdout.splitlines()
    assert called.endswith(
        "got 9, an int (was the function called, JobCluster(f(x))? give it "
        "uncalled: JobCluster(f))"
    )
    assert named == (
        "program 'compute' was not found: give the path of an existing file or the "
        "name of a program on PATH; compute is a function of this program: give the "
        "function itself, JobCluster(compute), not its name"
    )


def test_dispys_default_loglevel_leaves_a_programs_own_logging_alone(monkeypatch):
    """Without loglevel a cluster logs at INFO to stderr as dispy's (see
    tests/compat/programs/logger_*.py), unless the program set logging up (a root
    handler, a level on ``dispynb``) or runs in a notebook; a handler of its own on
    ``dispynb`` shows the lines at dispy's INFO, the stderr one silent."""
    own, root = logging.getLogger("dispynb"), logging.getLogger()
    monkeypatch.setattr(own, "handlers", [])
    monkeypatch.setattr(own, "propagate", True)
    monkeypatch.setattr(own, "level", logging.NOTSET)
    try:
        monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
        default_level()
        assert (own.level, own.handlers) == (logging.NOTSET, [])
        monkeypatch.setattr(root, "handlers", [])
        monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
        default_level()
        assert (own.level, own.handlers) == (logging.NOTSET, [])
        monkeypatch.delitem(sys.modules, "ipykernel")
        own.setLevel(logging.WARNING)
        default_level()
        assert own.level == logging.WARNING  # its level, its lines on stderr
        assert [type(h).__name__ for h in own.handlers] == ["_UntilConfigured"]
        own.handlers = []
        own.setLevel(logging.NOTSET)
        programs = io.StringIO()
        own.addHandler(logging.StreamHandler(programs))
        default_level()
        assert own.level == logging.INFO
        stderr = io.StringIO()
        own.handlers[-1].setStream(stderr)  # type: ignore[attr-defined]
        own.info("by the program's handler only")
        assert (programs.getvalue(), stderr.getvalue()) == (
            "by the program's handler only\n",
            "",
        )
    finally:
        own.setLevel(logging.NOTSET)  # (and forgets the loggers' cached levels)


def test_a_loglevel_given_is_kept_and_a_handler_added_later_shows_each_line_once(
    monkeypatch,
):
    """``JobCluster(loglevel=logging.DEBUG)`` in a program that set up no logging:
    dispynb's lines at DEBUG on stderr; a handler the program then adds to
    ``dispy.logger`` takes them over at that level (each was shown twice)."""
    own, root = logging.getLogger("dispynb"), logging.getLogger()
    monkeypatch.setattr(own, "handlers", [])
    monkeypatch.setattr(own, "propagate", True)
    monkeypatch.setattr(root, "handlers", [])
    try:
        set_level(logging.DEBUG)
        (ours,) = own.handlers
        stderr = io.StringIO()
        ours.setStream(stderr)  # type: ignore[attr-defined]
        own.debug("on stderr")
        programs = io.StringIO()
        own.addHandler(logging.StreamHandler(programs))
        own.debug("by the program's handler only")
        assert stderr.getvalue().endswith("dispynb DEBUG on stderr\n")
        assert "program's" not in stderr.getvalue()
        assert programs.getvalue() == "by the program's handler only\n"
    finally:
        own.setLevel(logging.NOTSET)  # (and forgets the loggers' cached levels)
