"""Compare the installed `tinker` SDK's client surface with Stillroom's SDK, method by method.

    python scripts/compare_surface.py              # summary counts
    python scripts/compare_surface.py --table      # and the per-method table (markdown)

For each public method of tinker's ServiceClient, TrainingClient, SamplingClient, RestClient and
APIFuture: `same` when the parameters (names, order, kinds, defaults) and the return shape
(value / future / coroutine) are the same; `compatible` when every call written for tinker binds
the same way on Stillroom (Stillroom may add optional parameters, or take tinker's required ones
with a default) and returns the same shape; else `differs` (with why) or `missing`. Then the
names in tinker.__all__ and tinker.types, and the exception hierarchy. It reads signatures with
inspect only; it calls nothing.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

CLASSES = ("ServiceClient", "TrainingClient", "SamplingClient", "RestClient", "APIFuture")
EMPTY = inspect.Parameter.empty
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def public_methods(cls: type) -> dict[str, Any]:
    out = {}
    for name in dir(cls):
        if name.startswith("_") and name != "__init__":
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or owner is object or owner.__module__.startswith(("typing", "abc")):
            continue
        out[name] = inspect.getattr_static(cls, name)
    return out


def shape(member: Any) -> str:
    """How a call answers: 'property', or '[async ]future' / '[async ]value' (what it returns, or
    for an async method what awaiting it gives)."""
    if isinstance(member, property):
        return "property"
    function = inspect.unwrap(member.__func__ if isinstance(member, (staticmethod, classmethod)) else member)
    prefix = "async " if inspect.iscoroutinefunction(function) else ""
    annotation = inspect.signature(function).return_annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return prefix + ("future" if "Future" in str(text) else "value")


def parameters(member: Any) -> list[inspect.Parameter]:
    function = inspect.unwrap(member.__func__ if isinstance(member, (staticmethod, classmethod)) else member)
    params = list(inspect.signature(function).parameters.values())
    return params[1:] if params and params[0].name in ("self", "cls") else params


def compare(theirs: Any, ours: Any) -> tuple[str, list[str]]:
    if isinstance(theirs, property) or isinstance(ours, property):
        same = isinstance(theirs, property) == isinstance(ours, property)
        return ("same", []) if same else ("differs", ["property vs method"])
    reasons: list[str] = []
    a, b = parameters(theirs), parameters(ours)
    b_by_name = {p.name: p for p in b}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in b)
    a_pos = [p.name for p in a if p.kind in POSITIONAL]
    b_pos = [p.name for p in b if p.kind in POSITIONAL]
    if b_pos[:len(a_pos)] != a_pos:
        reasons.append(f"positional order ({', '.join(a_pos)}) vs ({', '.join(b_pos)})")
    relaxed = []
    for p in a:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        q = b_by_name.get(p.name)
        if q is None:
            if not takes_kwargs:
                reasons.append(f"lacks {p.name}")
            continue
        if p.default is EMPTY and q.default is not EMPTY:
            relaxed.append(f"{p.name} optional")
        elif p.default is not EMPTY and (q.default is EMPTY or repr(q.default) != repr(p.default)):
            reasons.append(f"default of {p.name}: {p.default!r} vs {q.default!r}")
    names = {p.name for p in a}
    extra = [q for q in b if q.name not in names and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    required_extra = [q.name for q in extra if q.default is EMPTY]
    if required_extra:
        reasons.append(f"requires {', '.join(required_extra)}")
    if shape(theirs) != shape(ours):
        reasons.append(f"returns {shape(theirs)} vs {shape(ours)}")
    if reasons:
        return "differs", reasons
    strict = not relaxed and not extra and len(a) == len(b)
    return ("same" if strict else "compatible"), relaxed + [f"adds {q.name}" for q in extra]


def compare_clients(tinker: Any, stillroom: Any) -> tuple[dict[str, int], list[str]]:
    counts = {"same": 0, "compatible": 0, "differs": 0, "missing": 0}
    rows = ["| class | method | stillroom | notes |", "|---|---|---|---|"]
    for class_name in CLASSES:
        theirs = public_methods(getattr(tinker, class_name))
        ours = public_methods(getattr(stillroom, class_name))
        for name, member in sorted(theirs.items()):
            status, notes = ("missing", []) if name not in ours else compare(member, ours[name])
            counts[status] += 1
            rows.append(f"| {class_name} | {name} | {status} | {'; '.join(notes)} |")
    return counts, rows


def compare_names(tinker: Any, stillroom: Any) -> list[str]:
    lines = []
    top = [n for n in tinker.__all__ if not n.startswith("__")]
    missing = [n for n in top if not hasattr(stillroom, n)]
    lines.append(f"tinker.__all__: {len(top) - len(missing)}/{len(top)} present; "
                 f"missing: {', '.join(missing)}")
    public = [n for n in dir(tinker.types) if not n.startswith("_")
              and not inspect.ismodule(getattr(tinker.types, n))]
    missing = [n for n in public if not hasattr(stillroom.types, n)]
    lines.append(f"tinker.types: {len(public) - len(missing)}/{len(public)} present")
    wrong = []
    for name in ("TinkerError", "APIError", "APIStatusError", "APIConnectionError", "APITimeoutError",
                 "APIResponseValidationError", "RequestFailedError", "BadRequestError",
                 "AuthenticationError", "BillingError", "PermissionDeniedError", "NotFoundError",
                 "ConflictError", "UnprocessableEntityError", "RateLimitError", "InternalServerError"):
        ours = getattr(stillroom, name, None)
        want = [k.__name__ for k in getattr(tinker, name).__mro__[1:] if k.__module__.startswith("tinker")]
        have = [k.__name__ for k in ours.__mro__[1:]] if ours else None
        if have is None or any(base not in have for base in want):
            wrong.append(name)
    lines.append(f"exceptions with tinker's bases: {16 - len(wrong)}/16"
                 + (f"; not: {', '.join(wrong)}" if wrong else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the per-method table too")
    args = parser.parse_args()
    import tinker

    import stillroom

    counts, rows = compare_clients(tinker, stillroom)
    total = sum(counts.values())
    print(f"tinker {tinker.__version__} vs stillroom {stillroom.__version__}: {total} public client methods")
    print(f"  same {counts['same']}, compatible {counts['compatible']} "
          f"(match: {counts['same'] + counts['compatible']}), differs {counts['differs']}, "
          f"missing {counts['missing']}")
    for line in compare_names(tinker, stillroom):
        print("  " + line)
    if args.table:
        print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
