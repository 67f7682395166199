"""The grammar worker process: llama-cpp-python's JSON-schema converter, fixed where it is wrong.

Runs in a process of its own (a fresh interpreter) so that a hostile schema can be killed on
a deadline. Only the converter's module file is loaded, not the `llama_cpp` package: the
package loads libllama and numpy (~0.4 s and much memory) that the converter never uses.
"""

from __future__ import annotations

import importlib.util
import resource
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aicc.engine.grammar.gbnf import gbnf_literal
from aicc.engine.grammar.integers import integer_range_gbnf
from aicc.engine.grammar.limits import GrammarLimits
from aicc.engine.grammar.pattern import parse_pattern
from aicc.engine.grammar.pattern_gbnf import pattern_to_gbnf
from aicc.errors import InvalidRequestError

_MAX_WORKER_MEMORY = 2 << 30  # address space; a schema that needs more is hostile


@dataclass(frozen=True, slots=True)
class CompileJob:
    """One conversion, as sent to the worker (picklable; the schema is already checked)."""

    root: dict[str, Any]
    refs: dict[str, dict[str, Any]]
    limits: GrammarLimits
    param: str
    prefix: str
    suffix: str
    separator: str
    min_count: int
    max_count: int


Reply = tuple[str, str]  # ("ok", gbnf) | ("error", message) | ("ready", "")


def serve_fd(fd: int) -> None:
    """Process entry point: answer jobs on socket `fd` until the parent closes it."""
    serve(Connection(fd))


def serve(conn: Connection) -> None:
    """Answer jobs on `conn` until the parent closes it."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > _MAX_WORKER_MEMORY:
        resource.setrlimit(resource.RLIMIT_AS, (_MAX_WORKER_MEMORY, hard))
    converter_class = _converter_class()
    conn.send(("ready", ""))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        conn.send(_answer(converter_class, job))


def _answer(converter_class: Any, job: CompileJob) -> Reply:
    try:
        return "ok", convert(converter_class, job)
    except InvalidRequestError as exc:
        return "error", exc.message
    except RecursionError:
        return "error", "the schema's references nest too deeply to compile"
    except MemoryError:
        return "error", "compiling the schema needs too much memory"
    except Exception as exc:  # the converter reports what it cannot handle with assert & co.
        return "error", f"the schema could not be compiled ({type(exc).__name__}: {exc})"


def convert(converter_class: Any, job: CompileJob) -> str:
    """GBNF text for the job, start rule `root`.

    Raises:
        InvalidRequestError: the grammar is larger than `max_grammar_bytes`.
    """
    converter = converter_class(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.aicc_limits = job.limits
    converter.aicc_param = job.param
    converter._refs = dict(job.refs)  # resolved and checked by the caller; never fetched
    value = converter.visit(job.root, "json")
    parts = [gbnf_literal(text) for text in (job.prefix,) if text]
    parts += [value, *(gbnf_literal(text) for text in (job.suffix,) if text)]
    unit = converter._add_rule("json-unit", " ".join(parts)) if len(parts) > 1 else value
    more = f"{gbnf_literal(job.separator)} {unit}" if job.separator else unit
    repeat = job.max_count - max(job.min_count, 1)
    rule = unit
    if job.min_count > 1:
        rule += f" ({more}){{{job.min_count - 1}}}"
    if repeat:
        rule += f" ({more}){{0,{repeat}}}"
    if "root" in converter._rules:
        raise InvalidRequestError("the schema produced a rule named 'root'", param=job.param)
    converter._rules["root"] = rule if job.min_count > 0 else f"({rule})?"
    text: str = converter.format_grammar() + "\n"
    if len(text.encode()) > job.limits.max_grammar_bytes:
        raise InvalidRequestError(
            f"the schema compiles to a {len(text.encode())}-byte grammar; the limit is "
            f"{job.limits.max_grammar_bytes}", param=job.param,
        )  # fmt: skip
    return text


def _converter_class() -> Any:
    spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed")
    path = f"{next(iter(spec.submodule_search_locations))}/llama_grammar.py"
    module_spec = importlib.util.spec_from_file_location("aicc_llama_grammar", path)
    if module_spec is None or module_spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    # Upstream's string character admits raw control characters, which JSON forbids.
    module.PRIMITIVE_RULES["char"] = module.BuiltinRule(
        r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', []
    )
    invalid_rule_chars = module.INVALID_RULE_CHARS_RE
    reserved_names = module.RESERVED_NAMES

    base: Any = module.SchemaConverter

    class Converter(base):  # type: ignore[misc]
        aicc_limits: GrammarLimits
        aicc_param: str

        def visit(self, schema: dict[str, Any], name: str) -> str:
            if schema.get("type") == "integer" and "minimum" in schema:
                # Upstream ignores bounds; `normalize_schema` made them inclusive integers.
                rule_name = name + "-" if name in reserved_names else name or "root"
                body = integer_range_gbnf(schema["minimum"], schema["maximum"])
                key: str = self._add_rule(rule_name, f"({body}) space")
                return key
            result: str = super().visit(schema, name)
            return result

        def _format_literal(self, literal: str) -> str:
            # Upstream escapes only quotes and newlines; a `\` in a const or a property name
            # would turn into a GBNF escape and the output would not be the JSON it claims.
            return gbnf_literal(literal)

        def _visit_pattern(self, pattern: str, name: str) -> str:
            # Upstream passes regex escapes (\d, \.) through as invalid GBNF and matches the
            # decoded text where a JSON string needs the encoded one.
            nodes = parse_pattern(pattern, self.aicc_limits, param=self.aicc_param)
            body = pattern_to_gbnf(nodes, param=self.aicc_param)
            key: str = self._add_rule(name, f'"\\"" {body} "\\"" space')
            return key

        def _resolve_ref(self, ref: str) -> str:
            # Upstream names the rule after the ref's last segment, so `#/$defs/date` reuses
            # the builtin `date` rule and two `.../item` refs share one. Ours are unique.
            names: dict[str, str] = self.__dict__.setdefault("aicc_ref_names", {})
            if ref not in names:
                base = "def-" + invalid_rule_chars.sub("-", ref.rsplit("/", 1)[-1])
                name, i = base, 0
                while name in self._rules:
                    i += 1
                    name = f"{base}{i}"
                names[ref] = name
                # Reserved first: a recursive schema refers to the name before it is defined.
                self._rules[name] = "placeholder"
                self._rules[name] = self.visit(self._refs[ref], name)
            return names[ref]

    return Converter
