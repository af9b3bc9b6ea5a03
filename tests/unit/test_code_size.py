"""The package stays readable: no source file over 450 lines, no function over 60 lines of code
(its docstring, comments and blank lines not counted)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import medgen

SRC = Path(medgen.__file__).parent
MAX_FILE_LINES = 450
MAX_FUNCTION_CODE_LINES = 60


def _code_lines(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``node`` that hold code: not blank, not only a comment, not its docstring."""
    lines = set(range(node.lineno, node.end_lineno + 1))
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    text = source.splitlines()
    comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT and text[tok.start[0] - 1].strip().startswith("#")}
    return sum(1 for n in lines if text[n - 1].strip() and n not in comments)


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_source_file_is_over_450_lines():
    long = {str(p.relative_to(SRC)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by what they do): {long}"


def test_no_function_is_over_60_lines_of_code():
    long = {}
    for path in _sources():
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := _code_lines(source, node)) > MAX_FUNCTION_CODE_LINES:
                    long[f"{path.relative_to(SRC)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_CODE_LINES} lines of code: {long}"


def test_the_counter_counts_code_only():
    source = 'def f():\n    """Doc\n    more."""\n    # a comment\n\n    x = 1  # trailing\n    return x\n'
    node = ast.parse(source).body[0]
    assert _code_lines(source, node) == 3  # def, x = 1, return
