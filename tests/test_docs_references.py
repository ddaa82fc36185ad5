"""Every pointer from the code into docs/ resolves: the file exists and so does the section it names.

The code cites its reference notes by file and section (docs slash name, then §N.M); a reader of the
repository must be able to follow each one without anything outside it.
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = re.compile(r"docs/([\w.-]+\.md)((?:[ ,]*(?:§|and )?\s*\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"\d+(?:\.\d+)*")


def _references():
    for folder in ("src", "bench", "scripts", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "test_docs_references.py":
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                for m in REF.finditer(line):
                    yield path.relative_to(ROOT), lineno, m.group(1), SECTION.findall(m.group(2))


def _headings(doc: pathlib.Path) -> set[str]:
    found = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"#+\s+(\d+(?:\.\d+)*)[.\s]", line)
        if m:
            found.add(m.group(1))
    return found


def test_there_are_references():
    assert sum(1 for _ in _references()) >= 20  # the scheme and parser docstrings cite their formats


def test_every_reference_resolves():
    broken = []
    for where, lineno, name, sections in _references():
        doc = ROOT / "docs" / name
        if not doc.is_file():
            broken.append(f"{where}:{lineno}: docs/{name} does not exist")
            continue
        heads = _headings(doc)
        broken += [f"{where}:{lineno}: docs/{name} has no section {s}" for s in sections if s not in heads]
    assert not broken, "\n".join(broken)
