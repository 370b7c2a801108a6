"""What a sandboxed run returns, and the strict reading of the bytes the child sent.

The child is hostile: it shares its interpreter with the harness and can write anything to
the result pipe. `parse_result` therefore accepts only the harness's exact schema, within
bounds on size, nesting, element count, string length and integer digits, and never raises:
anything else is a malformed result, which scores that row as not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_RESULT_BYTES = 1 << 20
MAX_DEPTH = 16  # nesting of one returned value
MAX_NODES = 10_000  # elements over all returned values
MAX_STRING = 10_000  # characters of one string
MAX_INT_DIGITS = 400  # longer integers are read as a marker string (never equal a number)
FIELDS = {"parsed", "ran", "outputs", "error"}
OPTIONAL = {"span"}  # [start, end): where in the text sent the program was (extract mode)


@dataclass(frozen=True)
class ExecutionResult:
    parsed: bool  # parses and defines the function at top level
    ran: bool  # every call returned without exception, timeout or crash
    outputs: tuple  # returned values (JSON-able, else their repr), one per call
    error: str | None  # why not ran: "timeout", "MemoryError: ...", "SyntaxError: ..."
    # [start, end) of the program in the text sent (the whole text unless it was extracted
    # in the sandbox); None where the child did not say
    span: tuple[int, int] | None = field(default=None, compare=False)


def failed(error: str, parsed: bool = False) -> ExecutionResult:
    return ExecutionResult(parsed, False, (), error)


def _int(text: str):
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else f"<int of {len(text)} digits>"


def _value_problem(value) -> str | None:
    """Why a returned value is outside the bounds, or None. Iterative: no recursion."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return f"more than {MAX_NODES} elements"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH}"
        if item is None or isinstance(item, (bool, int, float)):
            continue
        if isinstance(item, str):
            if len(item) > MAX_STRING:
                return f"a string longer than {MAX_STRING} characters"
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            stack.extend((k, depth + 1) for k in item)
        else:
            return f"a value of type {type(item).__name__}"
    return None


def _span_problem(span, text_length: int) -> str | None:
    if (not isinstance(span, list) or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            or not 0 <= span[0] <= span[1] <= text_length):
        return "a program span outside the text"
    return None


def _schema_problem(result, n_calls: int, text_length: int) -> str | None:
    if not isinstance(result, dict) or not FIELDS <= set(result) <= FIELDS | OPTIONAL:
        return "not the harness's result object"
    problem = _span_problem(result["span"], text_length) if "span" in result else None
    if problem is not None:
        return problem
    parsed, ran, outputs, error = (result[k] for k in ("parsed", "ran", "outputs", "error"))
    if not isinstance(parsed, bool) or not isinstance(ran, bool) or not isinstance(outputs, list):
        return "fields of the wrong type"
    if ran:
        if not parsed or error is not None or len(outputs) != n_calls:
            return f"a run that returned {len(outputs)} values for {n_calls} calls"
        return _value_problem(outputs)
    if outputs or not isinstance(error, str) or len(error) > MAX_STRING:
        return "a failed run without its error"
    return None


def parse_result(data: bytes, n_calls: int, text_length: int = 0) -> ExecutionResult | str:
    """The result the child sent, or why it is malformed (`text_length`: characters of the
    text sent, which a span must lie within). Never raises."""
    if len(data) > MAX_RESULT_BYTES:
        return f"more than {MAX_RESULT_BYTES} bytes"
    try:
        result = json.loads(data.decode("utf-8"), parse_int=_int)
    except Exception as err:  # bad UTF-8 or JSON, RecursionError on deep nesting, ...
        return f"not JSON ({type(err).__name__})"
    problem = _schema_problem(result, n_calls, text_length)
    if problem is not None:
        return problem
    span = tuple(result["span"]) if "span" in result else None
    return ExecutionResult(result["parsed"], result["ran"], tuple(result["outputs"]),
                           result["error"], span)
