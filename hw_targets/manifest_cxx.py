"""The little C++ reading :mod:`hw_targets.manifest` needs: tokens, calls, declarations.

Not a C++ parser: enough to read the kernels the emitters write (and vendors'
declarations) without a compiler. Comments, string and character literals and
preprocessor lines are blanked first (line numbers kept). A call is an identifier,
optionally qualified (``ns::f``) and templated (``f<...>``), followed by ``(``; it is a
method call after ``.`` or ``->``. A name followed by ``(`` is a declaration instead
(a function defined or declared, or a variable built with constructor arguments) when
everything from the start of its statement (after ``;``, ``{``, ``}``, ``(``, ``,`` or a
label's ``:``) is declaration specifiers: type names, qualifiers, ``::``, ``*``, ``&``
and template arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Call", "Declarations", "Token", "base_type", "calls", "matching", "split_args",
           "strip_code", "tokenize"]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: never the name of a call (keywords, casts, built-in types, compiler extensions)
KEYWORDS = _words("""
if for while switch return sizeof alignof alignas decltype static_assert static_cast
dynamic_cast const_cast reinterpret_cast typeid noexcept catch throw new delete operator
__attribute__ __asm__ asm __asm defined template typename using int float double char short
long unsigned signed bool void auto case do else volatile __volatile__ __builtin_expect
""")
#: keywords that start an expression: what follows them is never a declaration
EXPRESSION_KEYWORDS = _words("""
return else case default do throw new delete goto sizeof alignof typeid co_return co_await
co_yield if while for switch
""")
_BOUNDARIES = frozenset({";", "{", "}", "(", ",", ":", "?", "["})
_TOKEN = re.compile(r"""
    (?P<ident>[A-Za-z_$]\w*) | (?P<number>\.?\d[\w.']*) | (?P<string>"") |
    (?P<op>::|->|\.\.\.|&&|\|\||[-+*/%&|^!=<>]=|\+\+|--|[^\s\w])
""", re.X)


@dataclass(frozen=True)
class Token:
    text: str
    line: int
    index: int = 0

    @property
    def ident(self) -> bool:
        return bool(re.match(r"[A-Za-z_$]", self.text))


def strip_code(code: str) -> str:
    """``code`` with comments, literals and preprocessor lines blanked (newlines kept)."""
    out, i, n = [], 0, len(code)

    def keep_newlines(text: str) -> str:
        return "\n" * text.count("\n")

    while i < n:
        ch = code[i]
        if code.startswith("//", i):
            j = code.find("\n", i)
            i = n if j < 0 else j
        elif code.startswith("/*", i):
            j = code.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(keep_newlines(code[i:j]))
            i = j
        elif ch in "\"'":
            j = i + 1
            while j < n and code[j] != ch:
                j += 2 if code[j] == "\\" else 1
            out.append('""' if ch == '"' else "0")
            out.append(keep_newlines(code[i:j]))
            i = j + 1
        elif ch == "#" and not code[code.rfind("\n", 0, i) + 1:i].strip():
            j = i
            while True:
                k = code.find("\n", j)
                if k < 0 or not code[:k].endswith("\\"):
                    break
                j = k + 1
            k = n if k < 0 else k
            out.append(keep_newlines(code[i:k]))
            i = k
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def tokenize(text: str) -> list[Token]:
    result: list[Token] = []
    line, last = 1, 0
    for m in _TOKEN.finditer(text):
        line += text.count("\n", last, m.start())
        last = m.start()
        result.append(Token(m.group(), line, len(result)))
    return result


def matching(tokens: list[Token], at: int) -> int:
    """Index of the bracket closing ``tokens[at]`` (``(``, ``[``, ``{`` or a template
    ``<``), or -1 (a ``<`` that does not open template arguments)."""
    opening = tokens[at].text
    if opening == "<":
        depth = 0
        for k in range(at, len(tokens)):
            t = tokens[k].text
            if t in ("(", "["):
                k2 = matching(tokens, k)
                if k2 < 0:
                    return -1
                continue
            if t == "<":
                depth += 1
            elif t == ">":
                depth -= 1
                if depth == 0:
                    return k
            elif t in (";", "{", "}", "&&", "||", ")", "]"):
                return -1
        return -1
    depth = 0
    for k in range(at, len(tokens)):
        t = tokens[k].text
        if t in "([{":
            depth += 1
        elif t in ")]}":
            depth -= 1
            if depth == 0:
                return k
    return len(tokens) - 1


def _skip(tokens: list[Token], k: int) -> int:
    """The index after the bracketed group starting at ``k`` (``k + 1`` if none)."""
    t = tokens[k].text
    if t in "([{" or (t == "<" and k > 0 and tokens[k - 1].ident):
        end = matching(tokens, k)
        return end + 1 if end >= 0 else k + 1
    return k + 1


def split_args(tokens: list[Token]) -> list[list[Token]]:
    """The comma-separated arguments of an argument list (no arguments: ``[]``)."""
    if not tokens:
        return []
    args: list[list[Token]] = [[]]
    k = 0
    while k < len(tokens):
        if tokens[k].text == ",":
            args.append([])
            k += 1
            continue
        end = _skip(tokens, k)
        args[-1].extend(tokens[k:end])
        k = end
    return args


def base_type(declaration: str) -> str:
    """The class or scalar name of a type as written (``const LocalTensor<T>&`` ->
    ``LocalTensor``, ``AscendC::TPipe*`` -> ``TPipe``)."""
    text = declaration
    while re.search(r"<[^<>]*>", text):
        text = re.sub(r"<[^<>]*>", " ", text)
    words = [w for w in re.findall(r"[A-Za-z_]\w*", re.sub(r"\w+\s*::\s*", "", text))
             if w not in _QUALIFIERS]
    return words[-1] if words else ""


_QUALIFIERS = _words("""
const volatile static inline constexpr extern struct class typename enum unsigned signed
register mutable __aicore__ __gm__ __ubuf__ __global__ __device__ __host__ __local__
__shared__ __global_ptr__ _global_ptr_ __shared_ptr__ _shared_ptr_ __simd__ __mlu_func__
__mlu_builtin__ __mlu_global__ __mlu_entry__ __mlu_device__ __nram__ __wram__
__mlu_shared__ __ldram__ __forceinline__ __inline__ __restrict__ __restrict
""")


def _decl_specifiers(tokens: list[Token], end: int) -> list[Token] | None:
    """The tokens from the start of the statement to ``tokens[end]`` (inclusive) if they
    are all declaration specifiers (at least one type name), else None."""
    k, found = end, []
    while k >= 0 and tokens[k].text not in _BOUNDARIES:
        t = tokens[k].text
        if t == ">":  # template arguments of a type: skip back to their '<'
            depth = 0
            while k >= 0:
                if tokens[k].text == ">":
                    depth += 1
                elif tokens[k].text == "<":
                    depth -= 1
                    if depth == 0:
                        break
                elif tokens[k].text in (";", "{", "}"):
                    return None
                k -= 1
            if k < 1 or not tokens[k - 1].ident:
                return None
            k -= 1
            continue
        if not (t in ("::", "*", "&", "&&", '""') or (tokens[k].ident
                                                       and t not in EXPRESSION_KEYWORDS)):
            return None
        found.append(tokens[k])
        k -= 1
    if k >= 0 and tokens[k].text == ":" and k >= 1 and tokens[k - 1].text == ")":
        return None  # a constructor's member initialiser list: calls, not declarations
    return found[::-1] if any(t.ident for t in found) else None


@dataclass(frozen=True)
class Call:
    name: str
    qualifier: str  # 'ns' of ns::f, '' when unqualified
    receiver: list[Token] | None  # the object of a method call
    args: list[list[Token]]
    line: int
    constructs: bool = False  # a class built: Type{...}, Type var(...), Type var{...}

    def display(self) -> str:
        who = "".join(t.text for t in self.receiver) + "." if self.receiver else ""
        who += f"{self.qualifier}::" if self.qualifier else ""
        return f"{who}{self.name}({len(self.args)} arg{'s' if len(self.args) != 1 else ''})"


def _receiver(tokens: list[Token], dot: int) -> list[Token]:
    """The object expression before ``tokens[dot]`` (``.`` or ``->``)."""
    k = dot - 1
    while k >= 0:
        t = tokens[k].text
        if t in (")", "]"):
            depth = 0
            while k >= 0:
                depth += tokens[k].text in (")", "]")
                depth -= tokens[k].text in ("(", "[")
                if depth == 0:
                    break
                k -= 1
            k -= 1
            continue
        if tokens[k].ident:
            if k >= 1 and tokens[k - 1].text in (".", "->", "::"):
                k -= 2
                continue
            return tokens[k:dot]
        break
    return tokens[k + 1:dot]


def _call_sites(tokens: list[Token]) -> list[tuple[int, int, int]]:
    """(name index, '(' index, start of qualifier chain) of every name followed by '('."""
    sites = []
    for i, tok in enumerate(tokens):
        if not tok.ident or tok.text in KEYWORDS or (i and tokens[i - 1].text in ("~",)):
            continue
        j = i + 1
        if j < len(tokens) and tokens[j].text == "<":
            close = matching(tokens, j)
            if close < 0:
                continue
            j = close + 1
        if j < len(tokens) and tokens[j].text == "(":
            p = i
            while p >= 2 and tokens[p - 1].text == "::" and tokens[p - 2].ident:
                p -= 2
            sites.append((i, j, p))
    return sites


def calls(code: str | list[Token]) -> list[Call]:
    """Every call of ``code`` (declarations and definitions excluded), in order, and every
    construction of a class with arguments (``Type{...}`` temporaries and variables
    declared ``Type v(...)`` or ``Type v{...}``: a call of ``Type`` marked ``constructs``)."""
    tokens = tokenize(strip_code(code)) if isinstance(code, str) else code
    found = []
    for i, j, p in _call_sites(tokens):
        receiver = None
        close = matching(tokens, j)
        args = split_args(tokens[j + 1:close])
        if p >= 1 and tokens[p - 1].text in (".", "->"):
            receiver = _receiver(tokens, p - 1)
        elif (specs := _decl_specifiers(tokens, p - 1)) is not None:
            if close + 1 < len(tokens) and tokens[close + 1].text in (";", ","):
                found.append(Call(base_type(" ".join(t.text for t in specs)), "", None, args,
                                  tokens[i].line, constructs=True))
            continue
        qualifier = "::".join(t.text for t in tokens[p:i] if t.text != "::")
        found.append(Call(tokens[i].text, qualifier, receiver, args, tokens[i].line))
    for i, tok in enumerate(tokens[1:-1], start=1):  # Type{...} and Type v{...}
        if not tok.ident or tok.text in KEYWORDS:
            continue
        j = i + 1
        if tokens[j].text == "<":
            j = matching(tokens, j) + 1
            if j <= 0 or j >= len(tokens):
                continue
        if tokens[j].text != "{":
            continue
        args = split_args(tokens[j + 1:matching(tokens, j)])
        if tokens[i - 1].text in ("(", ",", "=", "return"):
            found.append(Call(tok.text, "", None, args, tok.line, constructs=True))
        elif (specs := _decl_specifiers(tokens, i - 1)) is not None \
                and tokens[i - 1].text not in ("struct", "class", "union", "namespace", "enum"):
            found.append(Call(base_type(" ".join(t.text for t in specs)), "", None, args,
                              tok.line, constructs=True))
    return sorted(found, key=lambda c: c.line)


class Declarations:
    """The names a kernel defines itself (functions, types, namespaces, variables and
    parameters) and, per use site, the base type of a variable: the declaration of that
    name in the innermost enclosing block (a parameter's block is its function's body; a
    class member's is the whole class, so members used before their declaration count)."""

    def __init__(self, code: str) -> None:
        self.tokens = tokens = tokenize(strip_code(code))
        self.local: set[str] = set()
        self._typed: dict[str, list[tuple[int, int, str]]] = {}  # name: (start, end, type)
        self._blocks = self._block_spans()
        for k, t in enumerate(tokens[:-1]):
            if t.text in ("struct", "class", "union", "enum", "namespace") \
                    and tokens[k + 1].ident:
                self.local.add(tokens[k + 1].text)
        for i, _j, p in _call_sites(tokens):
            specs = _decl_specifiers(tokens, p - 1) if p >= 1 else None
            if specs is not None:
                self._declare(i, specs)
        for k in range(1, len(tokens) - 1):
            t, after = tokens[k], tokens[k + 1].text
            if not t.ident or t.text in KEYWORDS or after not in (";", "=", "[", ",", "{", ")") \
                    or tokens[k - 1].text in (".", "->", "::"):
                continue
            specs = _decl_specifiers(tokens, k - 1)
            if specs is not None:
                self._declare(k, specs)
                self._more_declarators(k + 1, specs)

    def _block_spans(self) -> list[tuple[int, int]]:
        spans, stack = [], []
        for k, t in enumerate(self.tokens):
            if t.text == "{":
                stack.append(k)
            elif t.text == "}" and stack:
                spans.append((stack.pop(), k))
        return spans

    def _scope(self, at: int) -> tuple[int, int]:
        """The block a declaration at token ``at`` is visible in."""
        tokens, depth, k = self.tokens, 0, at
        while k >= 0:  # inside a parameter list? its function's body is the scope
            t = tokens[k].text
            depth += t in (")", "]")
            depth -= t in ("(", "[")
            if depth < 0:
                if t == "(":
                    close = matching(tokens, k)
                    nxt = close + 1
                    while nxt < len(tokens) and tokens[nxt].text in ("const", "noexcept"):
                        nxt += 1
                    if nxt < len(tokens) and tokens[nxt].text == "{":
                        return nxt, matching(tokens, nxt)
                break
            if t in (";", "{", "}"):
                break
            k -= 1
        inner = [(a, b) for a, b in self._blocks if a < at < b]
        return max(inner) if inner else (0, len(tokens))

    def _declare(self, k: int, specs: list[Token]) -> None:
        name = self.tokens[k].text
        self.local.add(name)
        start, end = self._scope(k)
        self._typed.setdefault(name, []).append(
            (start, end, base_type(" ".join(s.text for s in specs))))

    def _more_declarators(self, m: int, specs: list[Token]) -> None:
        """Further declarators of one declaration: ``T a, *b = x, c[2];``."""
        tokens = self.tokens
        while m < len(tokens) and tokens[m].text not in (";", ")", "{", "}"):
            if tokens[m].text != ",":
                m = _skip(tokens, m)
                continue
            n = m + 1
            while n < len(tokens) and tokens[n].text in ("*", "&"):
                n += 1
            if n < len(tokens) - 1 and tokens[n].ident \
                    and tokens[n + 1].text in (";", "=", "[", ",", "{"):
                self._declare(n, specs)
            m = n

    def type_of(self, name: str, at: int) -> str:
        """The base type of variable ``name`` as seen at token ``at`` ('' if unknown)."""
        visible = [(e - s, kind) for s, e, kind in self._typed.get(name, []) if s <= at <= e]
        return min(visible)[1] if visible else ""
