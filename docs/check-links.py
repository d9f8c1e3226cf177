#!/usr/bin/env python3
"""Checks the mdBook sources under docs/src (Python 3 standard library only).

- every relative link [text](target) or [text](target#anchor) names a file under src/;
- every #anchor names a heading of the target page, by mdBook's rule: the heading's text
  lower-cased, whitespace to '-', characters other than letters, digits, '-' and '_'
  dropped, a repeated id suffixed '-1', '-2', ...;
- every page under src/ is listed in SUMMARY.md, and every page SUMMARY.md lists exists.

Links inside fenced code blocks and inline code are ignored, as mdBook ignores them.
Exit status 0 when all is well, 1 with one line per problem otherwise.
Usage: python3 docs/check-links.py [docs directory]
"""
import os
import re
import sys

LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def strip_code(text):
    """The page without fenced code blocks and inline code spans (line count kept)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            out.append("")
            continue
        if m:
            fence = m.group(1)
            out.append("")
            continue
        out.append(re.sub(r"(`+)(.+?)\1", "", line))
    return out


def heading_text(raw):
    """A heading's visible text: links to their text, code and emphasis marks removed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    return text.replace("`", "").replace("*", "").replace("<", "").replace(">", "")


def normalize_id(text):
    out = []
    for ch in text:
        if ch.isalnum() or ch in "_-":
            out.append(ch.lower())
        elif ch.isspace():
            out.append("-")
    return "".join(out)


def anchors(path):
    ids, seen, fence = set(), {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^\s*(```+|~~~+)", line)
            if m:
                fence = None if fence else m.group(1)
                continue
            if fence:
                continue
            h = HEADING.match(line.rstrip("\n"))
            if not h:
                continue
            base = normalize_id(heading_text(h.group(2)))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def main():
    docs = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(docs, "src")
    problems = []
    pages = sorted(
        os.path.relpath(os.path.join(d, f), src)
        for d, _, files in os.walk(src)
        for f in files
        if f.endswith(".md")
    )
    cache = {}

    def ids_of(page):
        if page not in cache:
            cache[page] = anchors(os.path.join(src, page))
        return cache[page]

    links = 0
    for page in pages:
        with open(os.path.join(src, page), encoding="utf-8") as f:
            lines = strip_code(f.read())
        for number, line in enumerate(lines, 1):
            for m in LINK.finditer(line):
                target = m.group(1)
                if EXTERNAL.match(target):
                    continue
                links += 1
                where = f"{page}:{number}: {target}"
                path, _, anchor = target.partition("#")
                if path:
                    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path))
                    if resolved.startswith(".."):
                        problems.append(f"{where}: leaves docs/src (mdBook does not ship it)")
                        continue
                    if not os.path.isfile(os.path.join(src, resolved)):
                        problems.append(f"{where}: no such file")
                        continue
                else:
                    resolved = page
                if anchor and resolved.endswith(".md") and anchor not in ids_of(resolved):
                    problems.append(f"{where}: no heading with id '{anchor}' in {resolved}")

    summary = os.path.join(src, "SUMMARY.md")
    if not os.path.isfile(summary):
        problems.append("src/SUMMARY.md is missing")
        listed = set()
    else:
        with open(summary, encoding="utf-8") as f:
            listed = {
                os.path.normpath(t.partition("#")[0])
                for t in LINK.findall("\n".join(strip_code(f.read())))
                if t and not EXTERNAL.match(t)
            }
    for page in pages:
        if page != "SUMMARY.md" and page not in listed:
            problems.append(f"{page}: not listed in SUMMARY.md")

    for problem in problems:
        print(problem)
    print(f"{len(pages)} pages, {links} relative links checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
