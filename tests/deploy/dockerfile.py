"""A small pure parser of Dockerfiles: what each stage runs from, and what its container gets (ENTRYPOINT, CMD,
ENV, USER, VOLUME, WORKDIR, LABEL), so tests derive a container's command and environment from its image.

    stage = final_stage(Path("images/server/Dockerfile"))
    stage.entrypoint  # ["warmpod"]          stage.env  # {"PATH": "/opt/warmpod/bin:$PATH", "HOME": "/tmp", ...}
    stage.user        # "10001:10001"        stage.volumes  # ["/tmp"]

Covered: parser directives (`# escape=`), comments (also inside continued lines), line continuations, global and
stage ARGs (with `build_args` overriding defaults), `$VAR`/`${VAR}`/`${VAR:-word}`/`${VAR:+word}` substitution
where Docker does it, quoting in ENV/LABEL/ARG, exec and shell forms, and stages built `FROM` an earlier stage
(which inherit its ENV, USER, WORKDIR, VOLUMEs, ENTRYPOINT and CMD). A variable the Dockerfile does not define
(the base image's PATH, say) is left as written. Not covered: heredocs (rejected with an error). The base image's
own settings are unknown here: a stage starting from an image starts empty, WORKDIR "/", user None (root).
Also: `.dockerignore` matching (`read_dockerignore`, `is_excluded`), to check what the build context sends.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?:=(\S*))?")
_HEREDOC = re.compile(r"<<-?\s*[\"']?[A-Za-z_]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DockerfileError(ValueError):
    """A Dockerfile this parser cannot read; the message names the line."""


@dataclass(frozen=True)
class Instruction:
    """One instruction, continuations joined and comments dropped. `args` is what follows the flags, as written."""

    keyword: str  # upper case: "RUN", "COPY"...
    args: str
    line: int  # 1-based line where the instruction starts
    flags: tuple[tuple[str, str], ...] = ()  # leading --name=value options (FROM, COPY, ADD, RUN), in order

    def flag(self, name: str) -> str | None:
        """The value of the last `--name[=value]` flag (an empty string for a bare flag), or None."""
        values = [v for n, v in self.flags if n == name]
        return values[-1] if values else None

    @property
    def exec_form(self) -> list[str] | None:
        """The arguments as a JSON array of strings (exec form), or None when written in shell form."""
        return _json_list(self.args)


@dataclass
class Stage:
    """One build stage and the image configuration it ends with."""

    index: int
    base: str  # the image reference with ARGs expanded, or the name of an earlier stage
    name: str | None = None
    base_stage: str | None = None  # set when `base` is an earlier stage of this Dockerfile
    platform: str | None = None
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # ARGs in scope at the end of the stage
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # None: not set here (or in a parent stage): the base image's user
    workdir: str = "/"
    volumes: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)  # [] when not set; shell form becomes [shell..., "cmd"]
    cmd: list[str] = field(default_factory=list)
    shell: list[str] = field(default_factory=lambda: ["/bin/sh", "-c"])

    def commands(self, keyword: str) -> list[Instruction]:
        """This stage's own instructions with that keyword (upper case), in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    @property
    def runs(self) -> list[str]:
        """The commands of this stage's RUN instructions, as written (continuations joined)."""
        return [i.args for i in self.commands("RUN")]


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (declared before the first FROM), build_args applied
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name.lower():
                return s
        raise KeyError(f"no stage named {name!r} (stages: {[s.name for s in self.stages]})")


def read_dockerfile(path: Path, build_args: Mapping[str, str] | None = None) -> Dockerfile:
    return parse_dockerfile(path.read_text(encoding="utf-8"), build_args)


def final_stage(path: Path, build_args: Mapping[str, str] | None = None) -> Stage:
    """The stage a plain `docker build -f path` produces: the image's entrypoint, env, user and volumes."""
    return read_dockerfile(path, build_args).final


def parse_dockerfile(text: str, build_args: Mapping[str, str] | None = None) -> Dockerfile:
    overrides = dict(build_args or {})
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions(text):
        if ins.keyword == "FROM":
            stages.append(_from(ins, global_args, stages))
            continue
        if ins.keyword == "ARG":
            scope = global_args if not stages else stages[-1].args
            if stages:
                stages[-1].instructions.append(ins)
            for name, default in _arg_decls(ins, _scope_vars(stages[-1]) if stages else global_args):
                if name in overrides:
                    scope[name] = overrides[name]
                elif default is not None:
                    scope[name] = default
                elif stages and name in global_args:  # `ARG NAME` in a stage brings the global value in
                    scope[name] = global_args[name]
            continue
        if not stages:
            raise DockerfileError(f"line {ins.line}: {ins.keyword} before the first FROM (only ARG may come first)")
        _apply(stages[-1], ins)
    if not stages:
        raise DockerfileError("no FROM: a Dockerfile needs at least one stage")
    return Dockerfile(args=global_args, stages=stages)


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile, continuations joined, comments and blank lines dropped."""
    lines = text.splitlines()
    escape = "\\"
    start = 0
    for start, raw in enumerate(lines):  # parser directives: only at the very top, before anything else
        m = _DIRECTIVE.match(raw.strip())
        if not m:
            break
        if m.group(1).lower() == "escape":
            if m.group(2) not in ("\\", "`"):
                raise DockerfileError(f"line {start + 1}: escape must be \\ or `, not {m.group(2)!r}")
            escape = m.group(2)
    else:
        start = len(lines)
    out: list[Instruction] = []
    i = start
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        first = i
        parts: list[str] = []
        while True:
            body = lines[i].rstrip()
            i += 1
            if body.endswith(escape):
                parts.append(body[: -len(escape)])
                # Comment and blank lines inside a continued instruction are dropped, as Docker does.
                while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                    i += 1
                if i < len(lines):
                    continue
            else:
                parts.append(body)
            break
        joined = "".join(parts).strip()
        keyword, _, rest = joined.partition(" ")
        if not rest and "\t" in keyword:
            keyword, _, rest = joined.partition("\t")
        keyword, rest = keyword.upper(), rest.strip()
        flags: list[tuple[str, str]] = []
        if keyword in ("FROM", "COPY", "ADD", "RUN"):
            while m := _FLAG.match(rest):
                flags.append((m.group(1), m.group(2) or ""))
                rest = rest[m.end() :].lstrip()
        if keyword in ("RUN", "COPY", "ADD") and _HEREDOC.search(rest) and _json_list(rest) is None:
            raise DockerfileError(f"line {first + 1}: heredocs are not supported by this parser")
        out.append(Instruction(keyword, rest, first + 1, tuple(flags)))
    return out


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """`text` with $VAR, ${VAR}, ${VAR:-word} and ${VAR:+word} expanded; unknown variables stay as written."""
    return "".join(_words(text, variables, split=False)) if text else text


# ---------------------------------------------------------------------------------------------------- internals


def _from(ins: Instruction, global_args: Mapping[str, str], stages: Sequence[Stage]) -> Stage:
    words = substitute(ins.args, global_args).split()
    if len(words) == 3 and words[1].lower() == "as":
        image, name = words[0], words[2].lower()
    elif len(words) == 1:
        image, name = words[0], None
    else:
        raise DockerfileError(f"line {ins.line}: FROM takes an image and an optional `AS name`, got {ins.args!r}")
    platform = ins.flag("platform")
    stage = Stage(index=len(stages), base=image, name=name, platform=platform, instructions=[ins])
    parent = next((s for s in stages if s.name is not None and s.name == image.lower()), None)
    if parent is not None:
        stage.base_stage = parent.name
        stage.env, stage.labels = dict(parent.env), dict(parent.labels)
        stage.user, stage.workdir, stage.volumes = parent.user, parent.workdir, list(parent.volumes)
        stage.entrypoint, stage.cmd, stage.shell = list(parent.entrypoint), list(parent.cmd), list(parent.shell)
    return stage


def _scope_vars(stage: Stage) -> dict[str, str]:
    """What a stage's instructions can expand: its ARGs, overridden by its ENV (as Docker resolves them)."""
    return {**stage.args, **stage.env}


def _apply(stage: Stage, ins: Instruction) -> None:
    stage.instructions.append(ins)
    variables = _scope_vars(stage)
    k = ins.keyword
    if k == "ENV":
        stage.env.update(_pairs(ins, variables, legacy=True))
    elif k == "LABEL":
        stage.labels.update(_pairs(ins, variables, legacy=False))
    elif k == "USER":
        stage.user = substitute(ins.args, variables)
    elif k == "WORKDIR":
        stage.workdir = posixpath.normpath(posixpath.join(stage.workdir, substitute(ins.args, variables)))
    elif k == "VOLUME":
        listed = ins.exec_form
        paths = [substitute(p, variables) for p in listed] if listed is not None else _words(ins.args, variables)
        for path in paths:
            if path not in stage.volumes:
                stage.volumes.append(path)
    elif k == "SHELL":
        listed = ins.exec_form
        if listed is None:
            raise DockerfileError(f"line {ins.line}: SHELL must be a JSON array")
        stage.shell = listed
    elif k in ("ENTRYPOINT", "CMD"):
        listed = ins.exec_form
        command = listed if listed is not None else [*stage.shell, ins.args]
        if k == "ENTRYPOINT":
            stage.entrypoint = command
            if not stage.commands("CMD"):  # an ENTRYPOINT resets a CMD inherited from the base
                stage.cmd = []
        else:
            stage.cmd = command


def _arg_decls(ins: Instruction, variables: Mapping[str, str]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for word in _words(ins.args, variables):
        name, eq, default = word.partition("=")
        if not _NAME.fullmatch(name):
            raise DockerfileError(f"line {ins.line}: bad ARG name {name!r}")
        out.append((name, default if eq else None))
    return out


def _pairs(ins: Instruction, variables: Mapping[str, str], *, legacy: bool) -> dict[str, str]:
    """KEY=VALUE pairs (ENV, LABEL), or ENV's legacy `KEY value with spaces` form."""
    first = ins.args.split(None, 1)
    if legacy and first and "=" not in first[0]:
        value = first[1] if len(first) > 1 else ""
        return {first[0]: "".join(_words(value, variables, split=False)).strip()}
    out: dict[str, str] = {}
    for word in _words(ins.args, variables):
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise DockerfileError(f"line {ins.line}: {ins.keyword} wants KEY=VALUE pairs, got {word!r}")
        out[key] = value
    return out


def _words(text: str, variables: Mapping[str, str], *, split: bool = True) -> list[str]:
    """Docker's word processing: quotes removed, backslash escapes, variables expanded outside single quotes."""
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    i, n = 0, len(text)
    quote: str | None = None
    while i < n:
        c = text[i]
        if quote is None and split and c.isspace():
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
            i += 1
            continue
        in_word = True
        if quote == "'":
            if c == "'":
                quote = None
            else:
                cur.append(c)
            i += 1
        elif c == "\\" and i + 1 < n and (quote is None or text[i + 1] in '"\\$'):
            cur.append(text[i + 1])
            i += 2
        elif c in "'\"" and split and (quote is None or quote == c):
            quote = None if quote else c
            i += 1
        elif c == "$":
            value, i = _expand(text, i, variables)
            cur.append(value)
        else:
            cur.append(c)
            i += 1
    if quote is not None:
        raise DockerfileError(f"unterminated {quote} quote in {text!r}")
    if in_word:
        words.append("".join(cur))
    return words


def _expand(text: str, i: int, variables: Mapping[str, str]) -> tuple[str, int]:
    """The value of the reference at text[i] ('$'), and the index after it."""
    if text.startswith("${", i):
        end = text.find("}", i)
        if end < 0:
            raise DockerfileError(f"unterminated ${{ in {text!r}")
        inner = text[i + 2 : end]
        name, op, word = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?::([-+]))?(.*)", inner, re.S).groups()  # type: ignore[union-attr]
        if op is None and word:
            raise DockerfileError(f"unsupported substitution ${{{inner}}} in {text!r}")
        if op == "-":
            return (variables[name] if variables.get(name) else substitute(word, variables)), end + 1
        if op == "+":
            return (substitute(word, variables) if variables.get(name) else ""), end + 1
        return variables.get(name, text[i : end + 1]), end + 1
    m = _NAME.match(text, i + 1)
    if m is None:
        return "$", i + 1
    return variables.get(m.group(0), "$" + m.group(0)), m.end()


def _json_list(args: str) -> list[str] | None:
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


# ---------------------------------------------------------------------------------------------------- .dockerignore


def read_dockerignore(path: Path) -> list[str]:
    """The patterns of a .dockerignore (comments and blank lines dropped, paths cleaned), in order."""
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        out.append(("!" if negate else "") + pattern)
    return out


def is_excluded(path: str, patterns: Sequence[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context root) out of the build context: the last pattern
    matching the path or one of its parent directories decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))
