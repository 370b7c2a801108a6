"""The code that runs first inside the sandbox: read the job, limit resources, run the program.

Its source is passed to the sandboxed interpreter with `-c` (standard library only, no
project code is visible there). The job arrives on stdin as JSON; the result leaves on the
file descriptor named by argv[1], as one JSON object (stdout and stderr are the parent's
/dev/null), and the process ends at once with
`os._exit` so nothing the program registered (atexit, threads) runs after it. Nothing here
is trusted by the parent: the program shares this interpreter and can write anything to
that descriptor, so the parent validates the result strictly (`soups.sandbox.result`).
"""

import ast
import json
import os
import resource
import sys

MAX_REPR = 1000  # characters kept of a value JSON cannot carry
MAX_ERROR = 300


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


def _run(job: dict) -> dict:
    program, name = job["program"], job["function"]
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
    result = _run(job)
    try:
        data = json.dumps(result, allow_nan=True).encode()
    except BaseException as err:
        data = json.dumps({"parsed": True, "ran": False, "outputs": [],
                           "error": f"unencodable result: {_error(err)}"}).encode()
    if len(data) > int(job["result_bytes"]):
        data = json.dumps({"parsed": True, "ran": False, "outputs": [],
                           "error": "result too large"}).encode()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out_fd, view):]
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
