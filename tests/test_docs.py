"""The README and docs/ keep their promises: the two commands, links that resolve, every option
in the configuration reference, sync's contract with the code's numbers, module paths that
exist, no history."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker import options
from worker.plan import rounds

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e . && "
    ".venv/bin/python -m worker run jobs/examples/groups.jsonl --sandbox"
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_readme_is_short_and_gives_the_two_commands() -> None:
    """README.md fits in 300 lines and holds the quick start and the test command verbatim;
    CI runs that same test command."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert QUICK_START in text
    assert "\nbash scripts/test\n" in text
    assert "exec bash scripts/test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    """Each relative link names a file that exists and, with #anchor, a heading in it."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists() or (anchor and anchor not in anchors(where)):
            broken.append(target)
    assert broken == []


def test_the_link_checker_sees_a_broken_anchor() -> None:
    """The anchor rule matches GitHub's for our headings, and a wrong anchor is not found."""
    assert slug("## Many workers: one shared budget (Redis)".lstrip("# ")) == (
        "many-workers-one-shared-budget-redis"
    )
    assert "exit-codes" in anchors(DOCS / "contract.md")
    assert "no-such-heading" not in anchors(DOCS / "contract.md")


def _flags(command: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "worker", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", out)) - {"--help"}


def test_the_configuration_reference_lists_every_option() -> None:
    """docs/configuration.md has a row for every flag `run`, `sync` and `export` accept, and
    each option of the option table with its job key and WORKER_* variable."""
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    flags = _flags("run") | _flags("sync") | _flags("export")
    assert {"--rate", "--prune", "--output"} <= flags  # the help was read
    missing = {f for f in flags if not any(f"`{f}" in row for row in rows)}
    assert missing == set()
    for opt in options.OPTIONS:
        if opt.hidden:
            continue
        row = next(r for r in rows if r.startswith(f"| `--{opt.flag}"))
        assert f"`{opt.flag}`" in row and f"`{opt.env}`" in row, opt.flag


def _figure(value: float) -> str:
    """A number as the docs write it: 4, 2, 60 (no trailing `.0`)."""
    return f"{value:g}"


def test_the_sync_contract_is_written_with_the_codes_numbers() -> None:
    """contract.md states sync's exit-0 promise with the rounds, pause and listing-freshness
    numbers that worker.plan.rounds has; no placeholder is left, and nightly-sync.md links to it."""
    contract = (DOCS / "contract.md").read_text(encoding="utf-8")
    section = contract.split("### What exit 0 means for `sync`", 1)[1].split("\n## ", 1)[0]
    section = " ".join(section.split())  # the numbers are checked whatever the line breaks
    for page in PAGES:
        assert "<!-- sync-contract -->" not in page.read_text(encoding="utf-8"), page.name
    assert f"at most **{rounds.MAX_ROUNDS} rounds**" in section
    assert f"**{_figure(rounds.ROUND_PAUSE_S)} s pause**" in section
    assert f"at most **{_figure(rounds.FRESH_S)} s** before the delete" in section
    assert f"within the {_figure(rounds.FRESH_S)} s a listing may serve deletes" in section
    assert "exits **3**" in section
    nightly = " ".join((DOCS / "nightly-sync.md").read_text(encoding="utf-8").split())
    assert "contract.md#what-exit-0-means-for-sync" in nightly
    assert f"at most {rounds.MAX_ROUNDS} rounds" in nightly


CODE_PATH = re.compile(r"\bworker/[\w/]+\.py\b")


def test_every_module_path_named_in_the_docs_exists() -> None:
    """Each `worker/....py` path the README or docs/ name is a file in the tree, so the next
    move of a module shows up here instead of in a reader's file browser."""
    named = {
        (page.name, path)
        for page in PAGES
        for path in CODE_PATH.findall(page.read_text(encoding="utf-8"))
    }
    assert named, "the pattern found no path at all"
    missing = sorted((page, path) for page, path in named if not (ROOT / path).is_file())
    assert missing == []


def test_the_module_path_check_sees_a_moved_module() -> None:
    """The path pattern picks out old and nested module paths alike from prose."""
    text = "typed (`worker/records.py`), see worker/ledger/records.py and worker/sandbox/."
    assert CODE_PATH.findall(text) == ["worker/records.py", "worker/ledger/records.py"]
    assert not (ROOT / "worker/records.py").exists()


def test_the_docs_tell_no_history() -> None:
    """No issue numbers and no before/after of past sessions in the README or docs/."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"\bissues? #?\d+", text, flags=re.I), page.name
