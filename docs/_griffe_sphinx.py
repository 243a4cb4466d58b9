"""Griffe extension: render the Sphinx markup in our docstrings as Markdown.

The docstrings follow optax's style (Google sections with Sphinx roles and
``.. math::`` blocks), which reads well in ``help()`` and in Sphinx. mkdocstrings
renders docstrings as Markdown, so before rendering this rewrites:

* ``.. math::`` blocks into ``$$ ... $$`` display maths (``aligned`` when the block
  uses ``&`` alignment), rendered by pymdownx.arithmatex and MathJax;
* ``:math:`x``` into inline maths;
* ``:func:``/``:class:``/``:mod:``/``:data:`` roles into cross-references when the
  target is documented on the site, and into code otherwise;
* reStructuredText links ```text <url>`_`` into Markdown links;
* a ``Returns:`` section that opens with prose and a colon into a plain description;
* ``Example:`` headings into ``Examples:``, the section griffe renders as doctests;
* an ``Args:`` entry documenting several parameters at once (``b1, b2: See ...``)
  into one entry per parameter, since griffe expects one name per entry.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_MATH_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n"  # the directive
    r"(?P<body>(?:[ \t]*\n)*(?:(?P=indent)[ \t]+\S.*\n?(?:[ \t]*\n)*)+)",  # indented body
    re.MULTILINE,
)
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<([^>`]+)>`__?")
_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc):`(~?)([^`]+)`")

# Modules whose public names (their ``__all__``) have API pages on the site.
_EXAMPLE_HEADING = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)
_ARGS_HEADING = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params):\s*$")
_RETURNS_PROSE = re.compile(
    r"^(?P<head>[ \t]*Returns:[ \t]*\n[ \t]+)(?P<prose>[^:\n|\[]*\s[^:\n|\[]*):(?=\s)",
    re.MULTILINE,
)
_GROUPED_ITEM = re.compile(r"^(\s*)(\w+(?:\s*,\s*\w+)+)\s*:\s*(.*)$")

_DOCUMENTED_MODULES = ("adamax_jax", "adamax_jax.compat", "adamax_jax.sharding")


def _documented_names() -> set[str]:
    import importlib

    names: set[str] = set()
    for module_name in _DOCUMENTED_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        names.update(f"{module_name}.{n}" for n in getattr(module, "__all__", ()))
    return names


def _math_block(match: re.Match[str]) -> str:
    indent = match.group("indent")
    body = textwrap.dedent(match.group("body")).strip("\n")
    if "&" in body or "\\\\" in body:
        body = "\\begin{aligned}\n" + body + "\n\\end{aligned}"
    lines = ["$$", *body.splitlines(), "$$"]
    return "\n".join(indent + line if line else line for line in lines) + "\n\n"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_items(body: list[str]) -> list[str]:
    """One Args section's lines, with grouped entries split per parameter."""
    nonblank = [line for line in body if line.strip()]
    if not nonblank:
        return body
    item_indent = _indent(nonblank[0])
    items: list[list[str]] = []
    trailing: list[str] = []
    for line in body:
        if line.strip() and _indent(line) == item_indent:
            items.append([line])
        elif items:
            items[-1].append(line)
        else:
            trailing.append(line)
    out = trailing
    for item in items:
        header, rest = item[0], item[1:]
        # A list of names too long for one line continues on the next.
        while ":" not in header and header.rstrip().endswith(",") and rest:
            header = header.rstrip() + " " + rest.pop(0).strip()
        match = _GROUPED_ITEM.match(header)
        if match is None:
            out.extend([header, *rest])
            continue
        indent, names, description = match.groups()
        tail = [line for line in rest if line.strip()]
        split = re.split(r"\s*,\s*", names)
        # The first line (usually "See ...") goes to every name; a longer
        # description's remaining lines go once, to the last name.
        for name in split[:-1]:
            out.append(f"{indent}{name}: {description}")
        out.extend([f"{indent}{split[-1]}: {description}", *tail])
        out.extend(line for line in rest if not line.strip())
    return out


def _split_grouped_params(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        heading = _ARGS_HEADING.match(line)
        if heading is None:
            continue
        base = len(heading.group(1))
        body = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append(lines[i])
            i += 1
        out.extend(_split_items(body))
    return "\n".join(out)


class SphinxToMarkdown(griffe.Extension):
    """Rewrites Sphinx roles and maths in every docstring griffe loads."""

    def __init__(self) -> None:
        super().__init__()
        self._documented = _documented_names()

    def _role(self, match: re.Match[str]) -> str:
        tilde, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        candidates = [target] + [f"{m}.{target}" for m in _DOCUMENTED_MODULES]
        for candidate in candidates:
            if candidate in self._documented:
                return f"[`{shown}`][{candidate}]"
        return f"`{shown}`"

    def convert(self, text: str) -> str:
        """The docstring ``text`` with its Sphinx markup turned into Markdown."""
        text = _EXAMPLE_HEADING.sub(r"\1Examples:", text)
        text = _split_grouped_params(text)
        text = _MATH_BLOCK.sub(_math_block, text)
        text = _RST_LINK.sub(lambda m: f"[{m.group(1)}]({m.group(2)})", text)
        text = _INLINE_MATH.sub(lambda m: rf"\({m.group(1)}\)", text)
        text = _ROLE.sub(self._role, text)
        # "Returns: An X: more prose" is prose, not "type: description"; an escaped
        # colon keeps griffe from splitting it (the type comes from the signature).
        text = _RETURNS_PROSE.sub(lambda m: m.group("head") + m.group("prose") + "&#58;", text)
        return text

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self.convert(obj.docstring.value)
