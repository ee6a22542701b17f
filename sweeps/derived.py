"""Derived parameters: config fields computed from others by small arithmetic expressions (the space file's
`derived:` section).

    derived:
      model.d_ff: "round(8 / 3 * model.d_model / 64) * 64"
      model.num_heads: "model.d_model // 64"
      optimizer.lr: "base_lr * (data.batch_size / 32) ** 0.5"

An expression reads config fields by their dotted path (sampled, constant, from the base config, or derived
themselves) and free names: `parameters` entries without a dot (`base_lr` above), which are swept like any
parameter but set no config field themselves. The YAML is data, never code: expressions are parsed with `ast`
and evaluated by walking a whitelist of nodes (numbers, names, + - * / // % **, unary -, comparisons,
`a if cond else b`, and the functions in FUNCTIONS); anything else is refused when the space is read.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "round": (round, 1, 2),
    "min": (min, 2, 16),
    "max": (max, 2, 16),
    "abs": (abs, 1, 1),
    "int": (int, 1, 1),
    "float": (float, 1, 1),
    "log": (math.log, 1, 2),
    "exp": (math.exp, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
}
"""name -> (function, fewest arguments, most arguments): the only calls an expression may make."""
MAX_LENGTH = 500
"""Characters in one expression."""
MAX_EXPONENT = 64
"""|exponent| of `**`: enough for any scale rule, and 10 ** 10 ** 10 cannot hang the driver."""
MAX_INT = 2**64
"""An integer result beyond this is an error (the largest config integers, seeds, are below 2**64)."""

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}
_REFUSED = {  # how a message names a construct that is not arithmetic
    ast.Subscript: "subscripts",
    ast.Lambda: "lambda",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.BoolOp: "and/or",
    ast.NamedExpr: "assignment (:=)",
    ast.JoinedStr: "strings",
    ast.ListComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.Starred: "starred arguments",
    ast.Await: "await",
    ast.Yield: "yield",
}


class DerivedError(ValueError):
    """An expression that cannot be used or evaluated; the message says why, without the file and key (the
    caller adds them)."""


@dataclass(frozen=True)
class Expression:
    """One `derived:` entry, parsed and checked: the names it reads are known."""

    key: str
    """The config field it sets (dotted path)."""
    text: str
    """As written in the space file."""
    tree: ast.Expression
    """The parsed expression (only whitelisted nodes)."""
    names: frozenset[str]
    """Dotted config paths and free names it reads."""


def parse(key: str, text: Any, is_field: Callable[[str], bool], free: set[str]) -> Expression:
    """Parse and check `text`: every node whitelisted, every dotted name a config field (`is_field`), every other
    name one of `free`. Raises DerivedError."""
    if not isinstance(text, str) or not text.strip():
        raise DerivedError(f'expected an expression (a string such as "model.d_model // 64"), got {text!r}')
    if len(text) > MAX_LENGTH:
        raise DerivedError(f"expected an expression of at most {MAX_LENGTH} characters, got {len(text)}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise DerivedError(f"expected an arithmetic expression, got {text!r} ({e.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise DerivedError(f"expected an arithmetic expression, got {text!r} (nested too deeply)") from None
    names: set[str] = set()
    _check(tree.body, is_field, free, names)
    return Expression(key, text, tree, frozenset(names))


def _check(node: ast.AST, is_field: Callable[[str], bool], free: set[str], names: set[str]) -> None:
    """Refuse any node outside the whitelist; collect the names read."""
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            what = "strings" if isinstance(node.value, (str, bytes)) else f"the constant {node.value!r}"
            raise DerivedError(f"{what} not allowed (numbers only)")
        return
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = dotted_name(node)
        if name is None:
            raise DerivedError("attribute access is allowed only as a dotted config field (model.d_model)")
        if "." in name and not is_field(name):
            raise DerivedError(f"unknown config field '{name}'")
        if "." not in name and name not in free:
            if name in FUNCTIONS:
                raise DerivedError(f"'{name}' is a function: call it, e.g. {name}(x)")
            raise DerivedError(
                f"unknown name '{name}' (config fields are dotted, e.g. model.d_model; a free name must be a "
                f"parameter without a dot, e.g. parameters.{name})"
            )
        names.add(name)
        return
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise DerivedError(f"operator {type(node.op).__name__} not allowed (+ - * / // % ** only)")
        _check(node.left, is_field, free, names)
        _check(node.right, is_field, free, names)
        return
    if isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise DerivedError(f"unary operator {type(node.op).__name__} not allowed (unary - and + only)")
        _check(node.operand, is_field, free, names)
        return
    if isinstance(node, ast.Compare):
        if any(type(op) not in _COMPARE for op in node.ops):
            raise DerivedError("comparison not allowed (< <= > >= == != only)")
        for part in (node.left, *node.comparators):
            _check(part, is_field, free, names)
        return
    if isinstance(node, ast.IfExp):
        for part in (node.test, node.body, node.orelse):
            _check(part, is_field, free, names)
        return
    if isinstance(node, ast.Call):
        func = node.func.id if isinstance(node.func, ast.Name) else None
        if func not in FUNCTIONS:
            shown = func or ast.unparse(node.func)
            raise DerivedError(f"call of '{shown}' not allowed (functions: {', '.join(FUNCTIONS)})")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise DerivedError(f"{func}(): positional arguments only")
        _, low, high = FUNCTIONS[func]
        if not low <= len(node.args) <= high:
            expected = f"{low}" if low == high else f"{low} to {high}"
            raise DerivedError(f"{func}() takes {expected} arguments, got {len(node.args)}")
        for arg in node.args:
            _check(arg, is_field, free, names)
        return
    what = _REFUSED.get(type(node), type(node).__name__)
    raise DerivedError(f"{what} not allowed (an arithmetic expression over numbers and names)")


def dotted_name(node: ast.AST) -> str | None:
    """`model.d_model` for Attribute(Name('model'), 'd_model'), `base_lr` for Name('base_lr'), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def order(expressions: Mapping[str, Expression]) -> list[str]:
    """The keys, each after the derived keys it reads (a topological order, stable in file order).

    Raises DerivedError("KEY: cycle A -> B -> A") for a cycle, KEY being the first key of the cycle."""
    done: list[str] = []
    state: dict[str, str] = {}  # "visiting" or "done"

    def visit(key: str, path: list[str]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            cycle = path[path.index(key) :] + [key]
            raise DerivedError(f"{cycle[0]}: cycle {' -> '.join(cycle)}")
        state[key] = "visiting"
        for name in sorted(expressions[key].names):
            if name in expressions:
                visit(name, [*path, key])
        state[key] = "done"
        done.append(key)

    for key in expressions:
        visit(key, [])
    return done


def evaluate(expression: Expression, lookup: Callable[[str], Any]) -> Any:
    """The expression's value, reading names through `lookup`. Raises DerivedError for a failed operation
    (division by zero, log of a negative number, an exponent or result out of range)."""
    try:
        return _eval(expression.tree.body, lookup)
    except DerivedError:
        raise
    except ZeroDivisionError:
        raise DerivedError("division by zero") from None
    except OverflowError:
        raise DerivedError("result out of range") from None
    except (ValueError, TypeError) as e:
        raise DerivedError(str(e)) from None


def _eval(node: ast.AST, lookup: Callable[[str], Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Name, ast.Attribute)):
        value = lookup(dotted_name(node))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DerivedError(f"{dotted_name(node)} is {value!r}, not a number")
        return value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, lookup), _eval(node.right, lookup)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise DerivedError(f"exponent {right!r} out of range (|exponent| <= {MAX_EXPONENT})")
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, lookup)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, lookup)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _eval(comparator, lookup)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, lookup) else node.orelse, lookup)
    if isinstance(node, ast.Call):
        func = FUNCTIONS[node.func.id][0]  # type: ignore[attr-defined]  # checked by parse
        return _checked(func(*(_eval(a, lookup) for a in node.args)))
    raise DerivedError(f"{type(node).__name__} not allowed")  # parse refused it already


def _checked(value: Any) -> Any:
    """Numbers only, finite, integers within MAX_INT."""
    if isinstance(value, complex):
        raise DerivedError("result is a complex number")
    if isinstance(value, float) and not math.isfinite(value):
        raise DerivedError(f"result is {value!r}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise DerivedError(f"integer result out of range (|value| <= 2**64), got about {float(value):.3g}")
    return value


def compute(expressions: Mapping[str, Expression], keys: list[str], lookup: Callable[[str], Any]) -> dict[str, Any]:
    """Every derived value, in `keys` order (from `order`): each reads the values computed before it first, then
    `lookup`. Raises DerivedError("KEY: why") naming the expression that failed."""
    values: dict[str, Any] = {}

    def read(name: str) -> Any:
        return values[name] if name in values else lookup(name)

    for key in keys:
        try:
            values[key] = evaluate(expressions[key], read)
        except DerivedError as e:
            raise DerivedError(f"{key}: {e}") from None
    return values
