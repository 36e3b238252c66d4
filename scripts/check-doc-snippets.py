#!/usr/bin/env python3
"""Checks that the Python, Node and Go code of docs/clients.md (or of README.md) is the code the
tests run.

Each such code block in the guide is preceded by a marker naming a region of a test source:

    <!-- snippet: tests/node/client.test.js#node_unary -->

and the block must equal that region (the lines between `[START node_unary]` and
`[END node_unary]` comments, dedented). A Python, JavaScript/TypeScript or Go block without a marker
fails the check, and so does a region no block shows (a snippet dropped from the guide).

Usage: scripts/check-doc-snippets.py [docs/clients.md | README.md]
"""

import pathlib
import re
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKED_LANGUAGES = {"python", "py", "js", "javascript", "ts", "typescript", "go"}
# The test sources each guide must show every region of.
SHOWN_SOURCES = {
    "clients.md": ("tests/node/client.test.js", "tests/go/client/client_test.go", "tests/python/test_client.py"),
    "README.md": ("tests/python/verify_alert.py", "tests/python/test_segment.py", "tests/node/segment.test.js"),
}
MARKER = re.compile(r"^<!-- snippet: (?P<path>[^#\s]+)#(?P<name>[\w-]+) -->$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
REGION = re.compile(r"^\s*(?://|#) \[(?P<edge>START|END) (?P<name>[\w-]+)\]\s*$")


def regions(path):
    """The named regions of a source file, dedented, without their marker lines."""
    found, open_regions = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = REGION.match(line)
        if match is None:
            for lines in open_regions.values():
                lines.append(line)
            continue
        name = match["name"]
        if match["edge"] == "START":
            if name in open_regions or name in found:
                raise SystemExit(f"{path}:{number}: region {name} opened twice")
            open_regions[name] = []
        else:
            if name not in open_regions:
                raise SystemExit(f"{path}:{number}: region {name} closed but not opened")
            found[name] = textwrap.dedent("\n".join(open_regions.pop(name))).strip("\n")
    if open_regions:
        raise SystemExit(f"{path}: regions never closed: {', '.join(open_regions)}")
    return found


def blocks(guide):
    """(line number, language, marker or None, code) of every fenced block of the guide."""
    lines = guide.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        previous = lines[start - 1] if start > 0 else ""
        yield start + 1, fence["lang"], MARKER.match(previous), "\n".join(lines[start + 1 : j])
        i = j + 1


def main():
    guide = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "clients.md"
    problems, shown, sources = [], set(), {}
    for line, language, marker, code in blocks(guide):
        if marker is None:
            if language in CHECKED_LANGUAGES:
                problems.append(f"{guide.name}:{line}: a {language} block without a snippet marker")
            continue
        path = ROOT / marker["path"]
        if path not in sources:
            sources[path] = regions(path)
        name = marker["name"]
        expected = sources[path].get(name)
        if expected is None:
            problems.append(f"{guide.name}:{line}: {marker['path']} has no region {name}")
        elif code != expected:
            problems.append(f"{guide.name}:{line}: the block differs from {marker['path']}#{name}")
        shown.add((path, name))
    for test_source in SHOWN_SOURCES.get(guide.name, ()):
        path = ROOT / test_source
        for name in sources.get(path) or regions(path):
            if (path, name) not in shown:
                problems.append(f"{test_source}: region {name} is not shown in {guide.name}")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"snippets: {len(shown)} blocks of {guide.name} equal the code the tests run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
