"""JSON Schema → GBNF grammars for constrained decoding (response_format, required tool calls).

Kept free of heavy imports: the worker process imports this package too.
"""

from aicc.engine.grammar.compiler import GrammarCompiler
from aicc.engine.grammar.limits import GrammarLimits
from aicc.engine.grammar.validation import check_json_schema

__all__ = ["GrammarCompiler", "GrammarLimits", "check_json_schema"]
