"""Count the lines of the package: code, docstrings, comments and blank lines, per module and in all.

A line counts as code when it holds a token that is not a comment and not part of a docstring (the string that
opens a module, class or function). Run from the repository: ``python benchmarks/code_lines.py [FOLDER ...]``.
"""
import argparse
import ast
import io
import pathlib
import tokenize
from typing import Dict, Iterable, Set

REPO = pathlib.Path(__file__).resolve().parents[1]
_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def docstring_lines(tree: ast.AST) -> Set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def count(path: pathlib.Path) -> Dict[str, int]:
    text = path.read_text(encoding="utf-8")
    docs = docstring_lines(ast.parse(text))
    code = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in _SKIPPED:
            code.update(line for line in range(token.start[0], token.end[0] + 1) if line not in docs)
    return {"lines": len(text.splitlines()), "code": len(code), "docstrings": len(docs)}


def files(folders: Iterable[str]) -> Iterable[pathlib.Path]:
    for folder in folders:
        path = REPO / folder
        yield from [path] if path.is_file() else sorted(path.glob("*.py"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="*", default=["clip"])
    args = parser.parse_args()
    total = {"lines": 0, "code": 0, "docstrings": 0}
    print(f"{'file':<32} {'lines':>6} {'code':>6} {'docstrings':>10}")
    for path in files(args.folders):
        counts = count(path)
        for key in total:
            total[key] += counts[key]
        print(f"{str(path.relative_to(REPO)):<32} {counts['lines']:>6} {counts['code']:>6} {counts['docstrings']:>10}")
    print(f"{'total':<32} {total['lines']:>6} {total['code']:>6} {total['docstrings']:>10}")


if __name__ == "__main__":
    main()
