"""The documents in docs/ against the code they describe.

- docs/configuration.md lists every DEFAULT_CONFIG key with its current default, no other key,
  and names every key that has a range check;
- every section number the code cites ("translation.md 4.2", "translation.md section 7", the
  "# -- N.M" sub-banners of section 3) is a heading of docs/translation.md;
- docs/architecture.md has a row for every "# == N." section of iflow2api.py;
- every repository path named in the code, the README, the container and packaging files and the
  docs (docs/..., static/..., tests/..., bench/..., also with a prefix such as shared/) exists,
  every bare *.md name in the code is a document of this repository, and every relative link in
  the Markdown files resolves.
"""
import glob
import json
import os
import re

import pytest

import iflow2api

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(relpath):
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        return f.read()


def table_rows(text, first_header):
    """Rows (lists of stripped cells) of the Markdown tables whose first header cell is
    `first_header`, without the header and separator lines."""
    rows, inside = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_header:
            inside = True
        elif inside and not set(cells[0]) <= set("-: "):
            rows.append(cells)
    return rows


# -- docs/configuration.md ---------------------------------------------------------

def documented_keys():
    """{key: default cell} of the key tables (first header cell "Key")."""
    keys = {}
    for cells in table_rows(read("docs/configuration.md"), "Key"):
        for name in re.findall(r"`([^`]+)`", cells[0]):
            keys[name] = cells[1] if len(cells) > 1 else ""
    return keys


def test_every_config_key_is_documented():
    missing = sorted(set(iflow2api.DEFAULT_CONFIG) - set(documented_keys()))
    assert missing == [], "DEFAULT_CONFIG keys missing from docs/configuration.md: %s" % missing


def test_no_config_key_is_documented_that_does_not_exist():
    unknown = sorted(set(documented_keys()) - set(iflow2api.DEFAULT_CONFIG))
    assert unknown == [], "docs/configuration.md documents keys DEFAULT_CONFIG lacks: %s" % unknown


def test_documented_defaults_are_the_real_defaults():
    wrong = []
    for key, cell in documented_keys().items():
        if key in iflow2api.DEFAULT_CONFIG:
            expected = "`%s`" % json.dumps(iflow2api.DEFAULT_CONFIG[key], ensure_ascii=False)
            if expected not in cell:
                wrong.append("%s: documented %s, DEFAULT_CONFIG has %s" % (key, cell, expected))
    assert wrong == []


def test_every_range_checked_key_is_named_in_a_range_check_note():
    notes = " ".join(p for p in re.split(r"\n\s*\n", read("docs/configuration.md"))
                     if p.startswith("Range checks:"))
    named = set(re.findall(r"`([^`]+)`", notes))
    missing = sorted(set(iflow2api._RANGE_CHECKS) - named)
    assert missing == [], "keys with a range check but no 'Range checks:' note: %s" % missing


# -- docs/translation.md -------------------------------------------------------------

CODE_FILES = ("iflow2api.py", "iflow2api_gui.py", "build.py")
NUMBER = r"\d+(?:\.\d+)?"


def translation_headings():
    text = read("docs/translation.md")
    return set(re.findall(r"^#{2,4} (%s)\.?\s" % NUMBER, text, re.M))


def cited_translation_numbers():
    """(number, where) for every section of translation.md the code cites."""
    cited = []
    for name in CODE_FILES:
        if not os.path.exists(os.path.join(ROOT, name)):
            continue
        for number, line in _cites(read(name)):
            cited.append((number, "%s:%d" % (name, line)))
    source = read("iflow2api.py")
    start = source.index("\n# == 3. ")
    end = source.index("\n# == 4. ", start)
    first_line = source[:start].count("\n") + 2
    for i, line in enumerate(source[start:end].splitlines()):
        banner = re.match(r"# -- rule (%s)(?: / (%s))?\b" % (NUMBER, NUMBER), line)
        if banner:
            cited += [(n, "iflow2api.py:%d (section 3 banner)" % (first_line + i - 1))
                      for n in banner.groups() if n]
    return cited


def _cites(text):
    for match in re.finditer(r"translation\.md,? (?:section |§)?(%s)" % NUMBER, text):
        yield match.group(1), text.count("\n", 0, match.start()) + 1


def test_code_cites_translation_sections():
    assert len(cited_translation_numbers()) >= 10  # the scan itself still finds them


def test_every_cited_translation_section_is_a_heading():
    headings = translation_headings()
    missing = sorted({"%s (%s)" % (n, where) for n, where in cited_translation_numbers()
                      if n not in headings})
    assert missing == [], "sections cited by the code but not headings of docs/translation.md: %s" % missing


# -- docs/architecture.md ------------------------------------------------------------

def test_architecture_lists_every_section_of_the_module():
    banners = set(re.findall(r"^# == (\d+)\. ", read("iflow2api.py"), re.M))
    rows = {cells[0] for cells in table_rows(read("docs/architecture.md"), "N")}
    assert sorted(banners, key=int) == sorted(rows, key=int), \
        "the '# == N.' banners of iflow2api.py and the section table of docs/architecture.md differ"


# -- paths named anywhere ----------------------------------------------------------------

# Files whose text may name documents or other files of the repository.
NAMING_FILES = ("iflow2api.py", "iflow2api_gui.py", "build.py", "README.md", "Dockerfile",
                "docker-compose.yml", "pyproject.toml")
# docs/..., static/..., tests/..., bench/..., with any relative prefix (shared/docs/x.md,
# ../shared/docs/x.md). Not after "/", "~" or a word character: URL paths (/static/...) and
# home-directory paths are no repository files.
PATH_RE = re.compile(r"(?<![\w/.~-])((?:\.\./)*(?:[\w.-]+/)*(?:docs|static|tests|bench)/[\w./-]*[\w-])")
# A bare document name in code: "translation.md 4.2".
BARE_DOC_RE = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def naming_files():
    files = [f for f in NAMING_FILES if os.path.exists(os.path.join(ROOT, f))]
    files += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return files


def named_paths(relpath):
    """(path, line) of every repository path a file names; globs and templates skipped."""
    text = read(relpath)
    for match in PATH_RE.finditer(text):
        after = text[match.end():match.end() + 1]
        if after in ("*", "{", "<", "$"):
            continue  # static/*.css, tests/unit/test_{name}.py: patterns, not files
        yield match.group(1), text.count("\n", 0, match.start()) + 1


def test_every_path_named_in_code_readme_and_docs_exists():
    missing = []
    for relpath in naming_files():
        for path, line in named_paths(relpath):
            if not os.path.exists(os.path.join(ROOT, path)):
                missing.append("%s:%d names %s" % (relpath, line, path))
    assert missing == [], "paths named but not in the repository:\n  " + "\n  ".join(missing)


def test_every_document_named_in_code_is_in_the_repository():
    missing = []
    for relpath in CODE_FILES:
        if not os.path.exists(os.path.join(ROOT, relpath)):
            continue
        text = read(relpath)
        for match in BARE_DOC_RE.finditer(text):
            name = match.group(1)
            if not any(os.path.exists(os.path.join(ROOT, d, name)) for d in ("", "docs")):
                missing.append("%s:%d names %s" % (relpath, text.count("\n", 0, match.start()) + 1, name))
    assert missing == [], "documents named in code but not in the repository (root or docs/):\n  " + \
        "\n  ".join(missing)


@pytest.mark.parametrize("relpath", [f for f in ("README.md",) if os.path.exists(os.path.join(ROOT, f))]
                         + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))))
def test_relative_links_in_markdown_resolve(relpath):
    base = os.path.dirname(os.path.join(ROOT, relpath))
    broken = []
    for target in LINK_RE.findall(read(relpath)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, anchors
        if not os.path.exists(os.path.join(base, target.split("#")[0])):
            broken.append(target)
    assert broken == []
