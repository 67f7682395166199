"""A small Dockerfile reader for the deploy tests: instructions, stages, ARG/ENV values and the
paths a build context keeps. Enough for our own Dockerfiles, not a full BuildKit front end
(no heredocs, no escape directive)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

INSTRUCTIONS = frozenset(
    {
        "ADD",
        "ARG",
        "CMD",
        "COPY",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "FROM",
        "HEALTHCHECK",
        "LABEL",
        "ONBUILD",
        "RUN",
        "SHELL",
        "STOPSIGNAL",
        "USER",
        "VOLUME",
        "WORKDIR",
    }
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")
_FLAG = re.compile(r"^--([\w-]+)(?:=(\S*))?$")


class DockerfileError(ValueError):
    """The text is not a Dockerfile this reader understands."""


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    arguments: str
    line: int

    @property
    def flags(self) -> dict[str, str]:
        """Leading `--name=value` options (COPY --from, RUN --mount, HEALTHCHECK --interval)."""
        found = {}
        for word in self.arguments.split():
            match = _FLAG.match(word)
            if match is None:
                break
            found[match.group(1)] = match.group(2) or ""
        return found

    @property
    def words(self) -> list[str]:
        """The arguments after the flags: the JSON array (exec form) or shell words."""
        text = self.arguments.strip()
        while text.startswith("--"):
            text = text.split(None, 1)[1] if " " in text else ""
        if text.startswith("["):
            value = json.loads(text)
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise DockerfileError(f"line {self.line}: exec form must be a list of strings")
            return value
        return shlex.split(text)


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def args(self, global_args: dict[str, str]) -> dict[str, str]:
        """ARG defaults visible in this stage (a global ARG needs re-declaring to be seen)."""
        values: dict[str, str] = {}
        for instruction in self.all("ARG"):
            name, _, default = instruction.arguments.strip().partition("=")
            values[name] = _unquote(default) if default else global_args.get(name, "")
        return values

    def env(self) -> dict[str, str]:
        """ENV values after the stage's last ENV (``KEY=value`` form, ``$VAR`` expanded)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.arguments):
                if "=" not in word:
                    raise DockerfileError(f"line {instruction.line}: use ENV KEY=value")
                key, _, value = word.partition("=")
                values[key] = expand(value, values)
        return values


@dataclass(slots=True)
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def base_image(self, stage: Stage) -> str:
        return expand(stage.base, self.global_args)


def parse(path: Path) -> Dockerfile:
    """Read `path`; raise `DockerfileError` for an unknown instruction or a misplaced one."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(Stage(words[0], words[2], instruction.line))
            elif len(words) == 1:
                stages.append(Stage(words[0], None, instruction.line))
            else:
                raise DockerfileError(f"line {instruction.line}: FROM image [AS name]")
        elif stages:
            stages[-1].instructions.append(instruction)
        elif instruction.keyword == "ARG":
            name, _, default = instruction.arguments.strip().partition("=")
            global_args[name] = _unquote(default)
        else:
            raise DockerfileError(f"line {instruction.line}: {instruction.keyword} before FROM")
    if not stages:
        raise DockerfileError(f"{path}: no FROM")
    return Dockerfile(path, global_args, stages)


def expand(text: str, values: dict[str, str]) -> str:
    """Substitute ``$NAME``, ``${NAME}`` and ``${NAME:-default}`` as the builder does."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        found = values.get(name, "")
        return found or (match.group(2) or "")

    return _VARIABLE.sub(value, text)


def context_keeps(context: Path, ignore_file: Path, source: str) -> bool:
    """Whether `source` (relative to the context) is sent to the builder: the last matching
    pattern of the .dockerignore decides, ``!`` re-includes."""
    kept = True
    path = source.strip("/").removeprefix("./")
    for raw in ignore_file.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            kept = negate
    return kept and (context / path).exists()


def _instructions(text: str) -> list[Instruction]:
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    in_header = True
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            if in_header and not pending and re.match(r"#\s*syntax\s*=", stripped):
                continue
            in_header = False
            continue  # comments vanish, also inside a continued instruction
        in_header = False
        if not stripped and not pending:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(part for part in pending if part).partition(" ")
        pending = []
        if keyword.upper() not in INSTRUCTIONS:
            raise DockerfileError(f"line {start}: unknown instruction {keyword!r}")
        if "<<" in arguments and keyword.upper() in {"RUN", "COPY"}:
            raise DockerfileError(f"line {start}: heredocs are not supported by this reader")
        found.append(Instruction(keyword.upper(), arguments.strip(), start))
    if pending:
        raise DockerfileError("the file ends inside a continued line")
    return found


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value
