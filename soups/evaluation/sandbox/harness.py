"""The code that runs first inside the sandbox: read the job, limit resources, run the program.

Its source is passed to the sandboxed interpreter with `-c` (standard library only, no
project code is visible there). The job arrives on stdin as JSON. With `extract` set, the
job's text is a model's whole answer and the program is cut out of it here, under the same
limits as the program (`program_span`), so the evaluator never parses hostile text; the
result names the program's span in that text. The result leaves on the
file descriptor named by argv[1], as one JSON object (stdout and stderr are the parent's
/dev/null), and the process ends at once with
`os._exit` so nothing the program registered (atexit, threads) runs after it. Nothing here
is trusted by the parent: the program shares this interpreter and can write anything to
that descriptor, so the parent validates the result strictly (`soups.evaluation.sandbox.result`).
"""

import ast
import json
import os
import re
import resource
import sys

MAX_REPR = 1000  # characters kept of a value JSON cannot carry
MAX_ERROR = 300
SIGNALS_QUEUED = 16  # RLIMIT_SIGPENDING: the host user's queue is shared with the sandbox
FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
CODE_OPENERS = ("def ", "async def ", "import ", "from ", "class ", "@")
PARSE_BUDGET = 64  # characters parsed per character of answer, over the whole search


def _limit(job: dict) -> None:
    mem = int(job["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = max(1, int(job["timeout_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    size = int(job["file_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(job["open_files"]),) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_SIGPENDING, (SIGNALS_QUEUED, SIGNALS_QUEUED))


def _parse(program: str):
    """The module `program` parses to, or the line (1-based) its error is on (0: unknown)."""
    try:
        return ast.parse(program)
    except SyntaxError as err:
        return err.lineno if isinstance(err.lineno, int) and err.lineno > 0 else 0
    except BaseException:  # RecursionError / MemoryError on odd input
        return 0


def _defines(tree, name: str) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
               for node in tree.body)


def program_span(text: str, entry: str) -> tuple[int, int]:
    """Where the program is in a model's answer, as [start, end) character offsets: its first
    fenced block when there is one; else the longest run of lines that parses and defines
    `entry` (a model that goes on to write the next question after the program), starting
    at the first line or, after prose, at a line that opens code (`def`, `import`, ...);
    the whole answer when none does.

    Bounded: a syntax error on line k means no longer prefix parses, so the search cuts
    there instead of one line at a time; a prefix that parses without defining `entry`
    ends the search from that start (no shorter one defines it at top level); and the
    characters parsed over the whole search are capped at PARSE_BUDGET per character of
    the answer: a search that runs out of it has found nothing and gives the whole answer.
    """
    fenced = FENCED.search(text)
    if fenced:
        return fenced.start(1), fenced.end(1)
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    budget = PARSE_BUDGET * len(text) + 4096
    starts = [0] + [i for i, line in enumerate(lines) if i and line.startswith(CODE_OPENERS)]
    for start in starts:
        end = len(lines)
        while end > start and budget > 0:
            program = text[offsets[start]:offsets[end]]
            budget -= len(program)
            parsed = _parse(program)
            if not isinstance(parsed, int):
                if _defines(parsed, entry):
                    return offsets[start], offsets[start] + len(program.rstrip())
                break
            cut = start + parsed - 1 if parsed > 0 else end - 1
            end = cut if start < cut < end else end - 1
    return 0, len(text)


def _encodable(value):
    """The value if JSON carries it, else its repr (cut), else a placeholder; never raises."""
    try:
        json.dumps(value, allow_nan=True)
        return value
    except BaseException:
        pass
    try:
        return repr(value)[:MAX_REPR]
    except BaseException:
        return "<unrepresentable value>"


def _error(err: BaseException) -> str:
    try:
        return f"{type(err).__name__}: {err}"[:MAX_ERROR]
    except BaseException:
        return type(err).__name__[:MAX_ERROR]


def _run(job: dict, program: str) -> dict:
    name = job["function"]
    try:
        tree = ast.parse(program)
    except BaseException as err:  # SyntaxError, and RecursionError / MemoryError on odd input
        return {"parsed": False, "ran": False, "outputs": [], "error": _error(err)}
    if not any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body):
        return {"parsed": False, "ran": False, "outputs": [],
                "error": f"no function {name}() defined"}
    try:
        namespace = {"__name__": "__sandbox__"}
        exec(compile(tree, "<program>", "exec"), namespace)
        function = namespace.get(name)
        if not callable(function):
            raise NameError(f"{name} is not a function")
        outputs = [_encodable(function(*args)) for args in job["calls"]]
    except BaseException as err:
        return {"parsed": True, "ran": False, "outputs": [], "error": _error(err)}
    return {"parsed": True, "ran": True, "outputs": outputs, "error": None}


def main() -> None:
    out_fd = int(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    _limit(job)
    text = job["program"]
    start, end = program_span(text, job["function"]) if job.get("extract") else (0, len(text))
    result = _run(job, text[start:end])
    result["span"] = [start, end]
    try:
        data = json.dumps(result, allow_nan=True).encode()
    except BaseException as err:
        data = json.dumps({"parsed": True, "ran": False, "outputs": [],
                           "error": f"unencodable result: {_error(err)}",
                           "span": [start, end]}).encode()
    if len(data) > int(job["result_bytes"]):
        data = json.dumps({"parsed": True, "ran": False, "outputs": [],
                           "error": "result too large", "span": [start, end]}).encode()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out_fd, view):]
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
