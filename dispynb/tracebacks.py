"""Remote tracebacks that point at the script file (or notebook cell) the code came
from.

cloudpickle sends a function's code without its file name: on the node every frame of
code sent by value reads ``File "<dynamic-code>", line 8, in f``, with no source line.
Line numbers and function names survive, though, so the client, which still has the
code objects and their source (IPython keeps each cell's source in `linecache`), can
put the file and the line back.

`SourceMap.of` records, for the functions a run ships (and what they take with them by
value), each code object's name, file, line numbers and a snapshot of its source
lines. `SourceMap.rerender` rewrites a remote traceback: a ``<dynamic-code>`` frame
whose function name and line number match exactly one known place shows that place
(``Cell In[3], line 8, in f`` for a cell, else the file) and its source line. Frames
that match nothing, or more than one place, are left as they are: no line is ever
guessed.

A `JobCluster` rewrites its jobs' ``exception`` with a `LazySourceMap` of its
computation, built at the first traceback that needs it; `dispynb.jupyter.run.Run`
keeps its own `SourceMap`, taken when the run starts.
"""

from __future__ import annotations

import importlib.util
import json
import linecache
import re
import sys
import types
from collections.abc import Sequence
from typing import Any

from dispynb.captures import code_objects, global_names, reachable

__all__ = [
    "DYNAMIC_CODE",
    "LazySourceMap",
    "SourceMap",
    "client_file_names",
    "explain_missing_module",
    "missing_module_advice",
    "rerender_traceback",
]

#: The file name cloudpickle gives code it sends by value.
DYNAMIC_CODE = "<dynamic-code>"

#: The last line of a job that imported a module the node does not have.
_MISSING_MODULE = re.compile(
    r"^ModuleNotFoundError: No module named '(?P<name>[\w.]+)'$"
)

#: The last line of a job that read a global its function was not sent with.
_MISSING_NAME = re.compile(r"^NameError: name '(?P<name>\w+)' is not defined\b")

_FRAME = re.compile(
    r'^(?P<indent>[ \t]*)File "<dynamic-code>", line (?P<line>\d+), in (?P<name>.+?)$'
)
_FRAME_START = re.compile(r'^[ \t]*(File "|Cell In\[)')
#: A warning that code sent by value gave (``warnings.formatwarning``'s first line).
_WARNING = re.compile(r"^<dynamic-code>:(?P<line>\d+): (?P<rest>.+)$")
#: Any file's frame, for the files a cluster sent (`LazySourceMap` ``files``).
_FILE_FRAME = re.compile(
    r'^(?P<indent>[ \t]*)File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+?)$'
)


class SourceMap:
    """Where the code a run ships comes from: name -> (file, lines), and sources."""

    def __init__(self) -> None:
        # co_name -> [(filename, line numbers of that code object)]
        self._places: dict[str, list[tuple[str, frozenset[int]]]] = {}
        self._sources: dict[str, list[str]] = {}
        self._labels: dict[str, str] = {}
        self._seen: set[int] = set()

    @classmethod
    def of(cls, *roots: Any) -> SourceMap:
        """The map of ``roots`` (functions, classes, callables; None is skipped) and
        of the functions and classes they take with them by value."""
        sources = cls()
        found = reachable(*(root for root in roots if root is not None))
        for function in found.functions:
            sources.add_code(function.__code__)
        return sources

    def add_code(self, code: types.CodeType) -> None:
        """Record ``code`` and the code nested in it, with a snapshot of its source."""
        for each in code_objects(code):
            if id(each) in self._seen:
                continue
            self._seen.add(id(each))
            filename = each.co_filename
            if filename == DYNAMIC_CODE:
                continue
            if filename not in self._sources:
                lines = linecache.getlines(filename)
                if not lines:
                    continue  # no source: nothing to show, so never rewrite
                self._sources[filename] = list(lines)
                self._labels[filename] = _label(filename)
            numbers = frozenset(n for _, _, n in each.co_lines() if n is not None)
            self._places.setdefault(each.co_name, []).append((filename, numbers))

    def __len__(self) -> int:
        return sum(len(places) for places in self._places.values())

    def to_json(self) -> str:
        """The map as JSON, for a recovery journal: its places, labels and sources,
        so that another process (``recover_jobs`` after a crash) can map the
        tracebacks of jobs that ended while the client was gone."""
        return json.dumps(
            {
                "places": {
                    name: [[filename, sorted(numbers)] for filename, numbers in places]
                    for name, places in self._places.items()
                },
                "sources": self._sources,
                "labels": self._labels,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SourceMap:
        """The map `to_json` wrote (labels as they were then: ``Cell In[3]`` stays
        so outside the notebook)."""
        state = json.loads(text)
        sources = cls()
        sources._places = {
            name: [(filename, frozenset(numbers)) for filename, numbers in places]
            for name, places in state["places"].items()
        }
        sources._sources = state["sources"]
        sources._labels = state["labels"]
        return sources

    def locate(self, name: str, line: int) -> tuple[str, str] | None:
        """``(label, source line)`` of the one place where function ``name`` has line
        ``line``; None if there is no such place, or more than one."""
        places = self._places.get(name, ())
        found = self._only_file(
            {filename for filename, numbers in places if line in numbers}, line
        )
        return None if found is None else (self._labels[found[0]], found[1])

    def locate_line(self, line: int) -> tuple[str, str] | None:
        """``(file, source line)`` of the one file where a function known has line
        ``line`` (a warning names no function); None if none or several do."""
        files = {
            filename
            for places in self._places.values()
            for filename, numbers in places
            if line in numbers
        }
        return self._only_file(files, line)

    def _only_file(self, files: set[str], line: int) -> tuple[str, str] | None:
        """``(file, its line ``line``)`` if ``files`` is one file and that line is
        not blank."""
        if len(files) != 1:
            return None
        (filename,) = files
        lines = self._sources[filename]
        text = lines[line - 1].strip() if 1 <= line <= len(lines) else ""
        return (filename, text) if text else None

    def rerender(self, text: str | None) -> str:
        """``text`` (a remote traceback, or a job's stderr) with the
        ``<dynamic-code>`` frames that can be matched pointing at their cell or
        file, followed by their source line; and its warnings naming their file
        and line, followed by their source line, as Python prints them."""
        if not text or DYNAMIC_CODE not in text:
            return text or ""
        lines = text.splitlines(keepends=True)
        out: list[str] = []
        for index, line in enumerate(lines):
            warned = _WARNING.match(line.rstrip("\r\n"))
            found = warned and self.locate_line(int(warned["line"]))
            if warned and found:
                filename, source = found
                ending = line[len(line.rstrip("\r\n")) :] or "\n"
                out.append(f"{filename}:{warned['line']}: {warned['rest']}{ending}")
                following = lines[index + 1] if index + 1 < len(lines) else ""
                if not _is_source_line(following, ""):
                    out.append(f"  {source}{ending}")
                continue
            match = _FRAME.match(line.rstrip("\r\n"))
            place = None
            if match is not None:
                place = self.locate(match["name"], int(match["line"]))
            if match is None or place is None:
                out.append(line)
                continue
            label, source = place
            indent, number, name = match["indent"], match["line"], match["name"]
            ending = line[len(line.rstrip("\r\n")) :] or "\n"
            out.append(f"{indent}{label}, line {number}, in {name}{ending}")
            following = lines[index + 1] if index + 1 < len(lines) else ""
            if not _is_source_line(following, indent):
                out.append(f"{indent}  {source}{ending}")
        return "".join(out)


class LazySourceMap:
    """The `SourceMap` of a cluster's functions, built when a traceback first needs
    it (a job failed in code sent by value): a cluster whose jobs do not fail pays
    nothing, and the source lines are read when the failure is reported, as a local
    traceback reads them when it is printed."""

    def __init__(self, *roots: Any, files: Sequence[tuple[str, str]] = ()) -> None:
        self._roots = [root for root in roots if callable(root)]
        self._map: SourceMap | None = None
        #: ``(relative path on the node, path here)`` of the Python files sent.
        self._files = [(rel, path) for rel, path in files if rel.endswith(".py")]

    def rerender(self, text: str | None) -> str | None:
        """``text`` with its frames put back (see `SourceMap.rerender`), and the
        frames of the files sent (``depends``) naming them here, not in the node's
        directory; None stays None, and a map that cannot be built leaves the text
        as it is."""
        if text and self._files:
            text = client_file_names(text, self._files)
        if not text or DYNAMIC_CODE not in text or not self._roots:
            return text
        try:
            return self.built().rerender(text)
        except Exception:  # never cost a job its result: the raw text is still right
            return text

    def explain_missing_global(self, text: str) -> str:
        """``text``, a job's traceback, with how to fix its last line when that is a
        ``NameError`` for a global that a function sent by value reads, which this
        program defines now but did not when the function was sent (it took the
        globals it uses as they were then). Other text is returned as it is."""
        match = _MISSING_NAME.match(text.rstrip("\n").rsplit("\n", 1)[-1])
        if match is None or not self._roots:
            return text
        name = match["name"]
        try:
            functions = reachable(*self._roots).functions
        except Exception:  # never cost a job its result: the raw text is still right
            return text
        for function in functions:
            if name in function.__globals__ and name in global_names(function.__code__):
                return (
                    f"{text.rstrip()}\n({name} is a global of this program now, but "
                    f"was not when JobCluster() sent {function.__name__}: a "
                    "computation takes the globals it uses as they are when the "
                    f"cluster is created; set {name} before JobCluster(), or pass it "
                    "to the jobs as an argument)\n"
                )
        return text

    def built(self) -> SourceMap:
        """The map, built now if no traceback needed it yet (a recovery journal
        keeps it from the start: the jobs may end after this process)."""
        if self._map is None:
            self._map = SourceMap.of(*self._roots)
        return self._map


def client_file_names(text: str, files: Sequence[tuple[str, str]]) -> str:
    """``text`` (a remote traceback) with each frame of a file sent to the node
    (``files``: its relative path there, its path here) naming the file here, as a
    local traceback does, where the source line the node printed is that line of
    the file here (a file changed since is left as the node named it)."""
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        match = _FILE_FRAME.match(line.rstrip("\r\n"))
        if match is None or index + 1 >= len(lines):
            continue
        shown, indent = lines[index + 1], match["indent"]
        if not _is_source_line(shown, indent):
            continue
        remote, number = match["file"], int(match["line"])
        for relative, path in files:
            if not remote.endswith("/" + relative):
                continue
            linecache.checkcache(path)  # as a local traceback: the file as it is now
            if linecache.getline(path, number).strip() == shown.strip():
                start = line.index('"') + 1
                lines[index] = line[:start] + path + line[start + len(remote) :]
            break
    return "".join(lines)


def explain_missing_module(text: str) -> str:
    """``text``, a job's traceback, with how to fix its last line when that is a
    module the node lacks but this process imports (`missing_module_advice`).
    Other text is returned as it is (a module missing here too is no dispynb
    matter)."""
    advice = missing_module_advice(text)
    return f"{text.rstrip()}\n{advice}\n" if advice else text


def missing_module_advice(text: str) -> str:
    """How to fix the last line of ``text`` (a traceback, or an error's last line)
    when it is a module the node lacks but this process imports: a module of one
    file (beside the script) is sent with ``depends``, a package is installed on
    the node; ``""`` for other text."""
    lines = text.rstrip("\n").rsplit("\n", 1)
    match = _MISSING_MODULE.match(lines[-1])
    if match is None:
        return ""
    top = match["name"].split(".")[0]
    try:  # the top package only: finding it imports nothing
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return ""
    if spec is None:
        return ""
    where = f" from {spec.origin}" if spec.has_location and spec.origin else ""
    found = f"(this client imports {top!r}{where}, the node cannot"
    if spec.submodule_search_locations is None and where.endswith(".py"):
        # One source file: depends sends it (a package's or an extension's would
        # arrive without the rest of it).
        return (
            f"{found}: send it with JobCluster(..., depends=[{top}]), or install "
            "it on the node)"
        )
    return f"{found}: install it on the node)"


def rerender_traceback(text: str | None, *roots: Any) -> str:
    """``text`` rewritten with the source of ``roots`` (see `SourceMap.rerender`)."""
    return SourceMap.of(*roots).rerender(text)


def _is_source_line(line: str, indent: str) -> bool:
    """Whether ``line`` is the source line a traceback printed under a frame."""
    if not line.startswith(indent + "  ") or _FRAME_START.match(line):
        return False
    return bool(line.strip())


def _label(filename: str) -> str:
    """``'Cell In[3]'`` for an IPython cell, else ``'File "path"'``."""
    return cell_name(filename) or f'File "{filename}"'


def cell_name(filename: str) -> str | None:
    """``'Cell In[3]'`` if ``filename`` is the code of an IPython cell (a file
    such as ``/tmp/ipykernel_12/345.py``), as IPython's tracebacks name it; else
    None."""
    if "IPython" not in sys.modules:
        return None
    try:
        from IPython import get_ipython

        shell = get_ipython()
        named = shell.compile.format_code_name(filename) if shell else None
    except Exception:  # an old or unusual shell: fall back to the file name
        return None
    if not named:
        return None
    kind, name = named
    return f"{kind} {name}"
