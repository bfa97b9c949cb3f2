"""The package stays readable: no module over 500 lines, no function over 60 lines of code.

Checked on the source (AST and tokens), so a module or function that grows past the limit fails
here, not in review. A function may be longer where a comment on its ``def`` line says why, e.g.
``def loop(...):  # long: the round loop reads top to bottom on one screen``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hflmpi"
MAX_MODULE_LINES = 500
MAX_FUNCTION_CODE_LINES = 60
LONG_MARKER = re.compile(r"#\s*long:\s*\S")
# Modules other people are splitting right now; each entry says why, and the list empties at merge.
EXEMPT: dict[str, str] = {
}
_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENCODING, tokenize.ENDMARKER}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def code_lines(source: str) -> set[int]:
    """Return the numbers of the lines that hold code: not blank, not only comment, not docstring."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                lines.difference_update(range(body[0].lineno, (body[0].end_lineno or 0) + 1))
    return lines


def long_functions(source: str) -> list[tuple[str, int, int]]:
    """Return ``(name, def line, code lines)`` of each function whose body spans too many lines of code.

    The body runs from the first statement to the last (the signature does not count); nested
    functions count towards the function that holds them and are also checked on their own. A
    ``# long: <reason>`` comment on the ``def`` line exempts the function.
    """
    code = code_lines(source)
    text = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        span = range(node.body[0].lineno, (node.end_lineno or node.body[-1].lineno) + 1)
        count = len(code.intersection(span))
        if count > MAX_FUNCTION_CODE_LINES and not LONG_MARKER.search(text[node.lineno - 1]):
            found.append((node.name, node.lineno, count))
    return found


def test_the_counter_skips_blanks_comments_and_docstrings_and_honours_the_marker():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_CODE_LINES))
    source = (
        '"""Module docstring."""\n'
        "def f(a,\n"
        "      b):\n"
        '    """Docstring\n\n    over lines.\n    """\n'
        "    # a comment\n\n"
        f"{body}"
        "    return (a,\n"
        "            b)\n"
    )
    assert long_functions(source) == [("f", 2, MAX_FUNCTION_CODE_LINES + 2)]
    marked = source.replace("def f(a,", "def f(a,  # long: a table that reads best in one piece")
    assert long_functions(marked) == []
    short = source.replace("    return (a,\n            b)\n", "")
    assert long_functions(short) == []


def test_no_module_is_over_500_lines():
    too_long = {
        _relative(p): n for p in _modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
        and _relative(p) not in EXEMPT
    }
    assert too_long == {}, f"split these modules (lines, limit {MAX_MODULE_LINES}): {too_long}"


def test_no_function_is_over_60_lines_of_code_unless_its_def_line_says_why():
    too_long = {
        f"{_relative(p)}:{line} {name}": count for p in _modules() if _relative(p) not in EXEMPT
        for name, line, count in long_functions(p.read_text(encoding="utf-8"))
    }
    assert too_long == {}, (
        f"break these functions into helpers (lines of code, limit {MAX_FUNCTION_CODE_LINES}), or "
        f"say why on the def line with '# long: <reason>': {too_long}")


def test_exemptions_name_existing_modules():
    assert all((PACKAGE / name).is_file() for name in EXEMPT), "drop exemptions of modules that are gone"
