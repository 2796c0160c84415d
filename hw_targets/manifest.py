"""API manifests of the targets, and a checker of emitted kernels against them.

``hw_targets/<target>/manifest.json`` lists, as data, every intrinsic, class, method,
qualifier and macro a target's emitted kernels may use, each overload with its signature
as the vendor's public header or document writes it, where that is written
(``repository:path`` at a commit, or a document and section) and the chip generation it
is documented for (docs/TARGETS.md, "API manifests"). :func:`check_source` reads an
emitted kernel, finds every call in it (``f(``, ``obj.f(``, ``ns::f(``, ``f<...>(``) that
is not a C++ keyword, a function or type the kernel defines itself or one of its own
variables, and reports each call that no overload of the manifest allows: an unknown
name, a number of arguments no signature takes, or an argument whose declared type is a
manifest class that the signature does not take at that position.

``python -m hw_targets.manifest TARGET FILE...`` prints the violations of kernel files.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hw_targets.manifest_cxx import (
    Call,
    Declarations,
    Token,
    base_type,
    calls,
    matching,
    split_args,
    strip_code,
    tokenize,
)

__all__ = ["Call", "Declarations", "Entry", "Manifest", "Overload", "Violation", "calls",
           "check_source", "load_manifest", "main", "parse_signature"]

MANIFEST_DIR = Path(__file__).resolve().parent
#: scalar types a signature can name: an argument of a manifest class never binds to one
SCALARS = frozenset({
    "bool", "char", "short", "int", "long", "float", "double", "half", "float16", "bfloat16",
    "bfloat16_t", "int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t",
    "uint32_t", "uint64_t", "size_t", "unsigned", "signed", "void"})


@dataclass(frozen=True)
class Overload:
    """One signature, its source and the generation it is documented for; the numbers
    of arguments and the parameters' base types are parsed from ``signature``."""

    signature: str
    source: str
    generation: str
    min_args: int
    max_args: int | None  # None: variadic
    params: tuple[str, ...]  # base type of each parameter ('' when a template parameter)
    returns: str


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # intrinsic, class, method, qualifier, macro
    cls: str | None  # the class of a method
    overloads: tuple[Overload, ...]
    notes: str


@dataclass(frozen=True)
class Manifest:
    target: str
    generation: str
    namespaces: tuple[str, ...]  # qualifiers that name the vendor's namespace
    entries: tuple[Entry, ...]
    not_found: tuple[str, ...]  # calls searched for and not found in public sources

    def callables(self, name: str, cls: str | None = None) -> list[Entry]:
        """Entries called ``name``: free functions, macros and class constructors when
        ``cls`` is None, else the methods of class ``cls`` (every class for ``'*'``)."""
        if cls is None:
            return [e for e in self.entries if e.name == name and e.kind != "method"]
        return [e for e in self.entries if e.name == name and e.kind == "method"
                and cls in ("*", e.cls)]

    @property
    def classes(self) -> frozenset[str]:
        return frozenset(e.name for e in self.entries if e.kind == "class")


def _template_params(prefix: str) -> set[str]:
    return set(re.findall(r"\b(?:typename|class)\s*(?:\.\.\.)?\s*(\w+)", prefix))


def parse_signature(signature: str, name: str) -> tuple[int, int | None, tuple[str, ...], str]:
    """(fewest arguments, most arguments or None, parameter base types, return type) of
    ``signature``, a declaration of ``name`` as a vendor header writes it."""
    tokens = tokenize(strip_code(signature))
    at, paren = None, 0
    for i, t in enumerate(tokens[:-1]):
        if t.text == name:
            paren = i + 1
            if tokens[paren].text == "<" and matching(tokens, paren) > 0:
                paren = matching(tokens, paren) + 1
            if paren < len(tokens) and tokens[paren].text == "(":
                at = i
                break
    if at is None:
        raise ValueError(f"signature {signature!r} does not declare {name}(...)")
    close = matching(tokens, paren)
    start = 0
    if tokens and tokens[0].text == "template" and len(tokens) > 1 and tokens[1].text == "<":
        start = matching(tokens, 1) + 1
    wild = _template_params(" ".join(t.text for t in tokens[:start]))
    head = " ".join(t.text for t in tokens[start:at])
    returns = base_type(re.sub(r"__inout_pipe__\s*\(\s*\w*\s*\)", "", head))
    args = split_args(tokens[paren + 1:close])
    if not args or (len(args) == 1 and [t.text for t in args[0]] == ["void"]):
        return 0, 0, (), returns
    fewest, variadic, params = 0, False, []
    for arg in args:
        text = " ".join(t.text for t in arg)
        if "..." in text:
            variadic = True
            continue
        has_default = any(t.text == "=" for t in arg)
        fewest += 0 if has_default else 1
        decl = text.split("=")[0]
        kind = base_type(re.sub(r"\w+\s*(\[\s*\d*\s*\])?\s*$", "", decl).strip() or decl)
        params.append("" if kind in wild else kind)
    return fewest, None if variadic else len(params), tuple(params), returns


def _callable(raw: dict[str, str], overload: dict[str, str]) -> bool:
    """Whether an overload is called with parentheses (a qualifier or an object-like
    macro such as ``taskId`` is not)."""
    if raw["kind"] == "qualifier":
        return False
    name = raw["name"].split("::")[-1]
    return raw["kind"] != "macro" or bool(re.search(rf"\b{re.escape(name)}\(",
                                                    overload["signature"]))


def load_manifest(target: str, path: Path | None = None) -> Manifest:
    """The manifest of ``target`` (``hw_targets/<target>/manifest.json`` by default)."""
    path = path or MANIFEST_DIR / target / "manifest.json"
    data = json.loads(path.read_text())
    entries = []
    for raw in data["entries"]:
        overloads = []
        for o in raw.get("overloads", []):
            fewest, most, params, returns = (0, 0, (), "") if not _callable(raw, o) \
                else parse_signature(o["signature"], raw["name"].split("::")[-1])
            overloads.append(Overload(o["signature"], o["source"], o.get("generation", ""),
                                      fewest, most, params, returns))
        entries.append(Entry(raw["name"], raw["kind"], raw.get("class"), tuple(overloads),
                             raw.get("notes", "")))
    return Manifest(data["target"], data["generation"], tuple(data.get("namespaces", [])),
                    tuple(entries), tuple(data.get("not_found", [])))


@dataclass(frozen=True)
class Violation:
    call: Call
    reason: str
    kinds: tuple[str, ...] = ()  # the manifest class of each argument ('' when unknown)

    def __str__(self) -> str:
        return f"line {self.call.line}: {self.call.display()}: {self.reason}"


def _arg_type(arg: list[Token], decls: Declarations, manifest: Manifest) -> str:
    """The manifest class an argument expression has, when the kernel's declarations say
    so: a variable, a subscript of one, a method call's return type, or a temporary
    ``Type{...}`` / ``Type<...>{...}`` / ``Type(...)``; '' when unknown."""
    text = [t.text for t in arg]
    classes = manifest.classes
    if not text:
        return ""
    if len(text) == 1 or (text[1] == "[" and matching(arg, 1) == len(arg) - 1):
        kind = decls.type_of(text[0], arg[0].index)
        return kind if kind in classes else ""
    if text[0] in classes:
        after = matching(arg, 1) + 1 if text[1] == "<" else 1
        if 0 < after < len(arg) and text[after] in "({" and matching(arg, after) == len(arg) - 1:
            return text[0]
    if len(text) >= 4 and text[1] in (".", "->") and text[-1] == ")":
        receiver = decls.type_of(text[0], arg[0].index)
        methods = manifest.callables(text[2], receiver if receiver in classes else "*")
        returns = {o.returns for e in methods for o in e.overloads}
        if len(returns) == 1 and (kind := returns.pop()) in classes:
            return kind
    return ""


def _fits(overload: Overload, kinds: list[str]) -> bool:
    if len(kinds) < overload.min_args or (overload.max_args is not None
                                          and len(kinds) > overload.max_args):
        return False
    for kind, param in zip(kinds, overload.params, strict=False):
        if kind and param and param != kind and (param in SCALARS or param[:1].isupper()):
            return False
    return True


def check_source(code: str, manifest: Manifest) -> list[Violation]:
    """Every call of ``code`` that the manifest does not allow (see the module doc)."""
    decls = Declarations(code)
    violations = []
    for call in calls(decls.tokens):
        if call.constructs and call.name not in manifest.classes:
            continue  # the kernel's own types, scalars
        parts = call.qualifier.split("::") if call.qualifier else []
        while parts and parts[0] in manifest.namespaces:  # AscendC::Std::min -> Std::min
            parts.pop(0)
        qualifier = "::".join(parts)
        receiver = _arg_type(call.receiver, decls, manifest) if call.receiver else ""
        if not call.qualifier and call.name in decls.local and not receiver \
                and not call.constructs:
            continue  # the kernel's own function, type, variable or method
        name = f"{qualifier}::{call.name}" if qualifier else call.name
        kinds = [_arg_type(a, decls, manifest) for a in call.args]
        if call.receiver is not None:
            entries = manifest.callables(name, receiver or "*")
            where = f"a method of {receiver}" if receiver else "a method of any class"
        else:
            entries, where = manifest.callables(name), "a function, macro or class"
        if not entries:
            violations.append(Violation(call, f"not {where} in the {manifest.target} "
                                              "manifest", tuple(kinds)))
            continue
        overloads = [o for e in entries for o in e.overloads]
        if overloads and not any(_fits(o, kinds) for o in overloads):
            shown = "; ".join(sorted({o.signature for o in overloads}))[:600]
            violations.append(Violation(call, f"no overload takes these {len(kinds)} "
                                              f"argument(s) {kinds}; the manifest has: "
                                              f"{shown}", tuple(kinds)))
    return violations


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m hw_targets.manifest TARGET KERNEL.cc...", file=sys.stderr)
        return 2
    target, files = args[0], [Path(f) for f in args[1:]]
    if not (MANIFEST_DIR / target / "manifest.json").is_file():
        print(f"no manifest for target {target!r} in {MANIFEST_DIR}.", file=sys.stderr)
        return 2
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"no such kernel file: {', '.join(missing)}.", file=sys.stderr)
        return 2
    manifest = load_manifest(target)
    found = 0
    try:
        for path in files:
            for violation in check_source(path.read_text(errors="replace"), manifest):
                print(f"{path}:{violation}")
                found += 1
    except BrokenPipeError:  # the reader (head, less) stopped early
        sys.stderr.close()
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
