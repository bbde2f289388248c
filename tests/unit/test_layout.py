"""The map of iflow2api.py is true: the module docstring lists the sections, the banners
match it in order, every `Tests:` pointer names a file that exists, and no section uses a
module-level name defined in a later section (sections are layers, lowest first)."""
import ast
import bisect
import os
import re

from helpers import ROOT

SOURCE = os.path.join(ROOT, "iflow2api.py")
TEXT = open(SOURCE, encoding="utf-8").read()
BANNER = re.compile(r"^# == (\d+)\. (.+?) =+$", re.M)


def docstring_sections():
    doc = ast.get_docstring(ast.parse(TEXT))
    listed = doc.split("from sections above it:\n", 1)[1]
    return [(int(n), title.strip()) for n, title in re.findall(r"^\s*(\d+)\. (.+)$", listed, re.M)]


def banners():
    return [(int(n), title) for n, title in BANNER.findall(TEXT)]


# (line number, section number) of each banner, in order
SECTION_STARTS = [(TEXT.count("\n", 0, m.start()) + 1, int(m.group(1))) for m in BANNER.finditer(TEXT)]


def section_of(line: int) -> int:
    index = bisect.bisect_right([start for start, _n in SECTION_STARTS], line) - 1
    return SECTION_STARTS[max(index, 0)][1]


def test_banners_are_numbered_in_order_and_equal_the_docstring_list():
    found = banners()
    assert [n for n, _t in found] == list(range(len(found)))
    assert found == docstring_sections()


def test_only_top_level_banners_use_the_double_rule():
    """Sub-banners inside a section are `# -- ...`, never `# == ...`, and never start with a
    bare number that could be read as a section number."""
    assert len(re.findall(r"^# ==", TEXT, re.M)) == len(banners())
    assert not re.findall(r"^# -- \d", TEXT, re.M)


def test_every_tests_pointer_names_a_file_that_exists():
    comments = "\n".join(line for line in TEXT.splitlines() if line.startswith("#"))
    named = re.findall(r"tests/[\w/]+\.py|tests/[\w]+(?=[.,\s])", comments)
    assert named, "no Tests: pointers found"
    missing = sorted({path for path in named if not os.path.exists(os.path.join(ROOT, path))})
    assert missing == []


def _module_level_definitions(tree):
    defined = {}
    for node in tree.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        for name in names:
            defined.setdefault(name, section_of(node.lineno))
    return defined


def _names_used(node):
    """Names loaded anywhere in node, annotations left out (they are strings at run time)."""
    used = []

    class Visitor(ast.NodeVisitor):
        def visit_arg(self, arg):
            pass  # the annotation of a parameter

        def visit_FunctionDef(self, fn):
            for child in fn.decorator_list + fn.body + fn.args.defaults + fn.args.kw_defaults:
                if child is not None:
                    self.visit(child)

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_AnnAssign(self, assign):
            if assign.value is not None:
                self.visit(assign.value)

        def visit_Name(self, name):
            if isinstance(name.ctx, ast.Load):
                used.append((name.id, name.lineno))

    Visitor().visit(node)
    return used


def test_no_section_uses_a_name_from_a_later_section():
    tree = ast.parse(TEXT)
    defined = _module_level_definitions(tree)
    problems = []
    for node in tree.body:
        for name, line in _names_used(node):
            if name in defined and defined[name] > section_of(line):
                problems.append("line %d (section %d) uses %s from section %d"
                                % (line, section_of(line), name, defined[name]))
    assert problems == []


def test_all_lists_only_names_that_exist_and_the_main_entry_points():
    import iflow2api
    assert all(hasattr(iflow2api, name) for name in iflow2api.__all__)
    for name in ("anthropic_to_openai_request", "openai_to_anthropic_response", "AnthropicStream",
                 "responses_to_openai_request", "openai_to_responses_response", "ResponsesStream",
                 "SSEParser", "ChunkedDecoder", "TranslationError", "Iflow2apiError", "Config",
                 "Service", "add_web_admin", "main"):
        assert name in iflow2api.__all__, name
