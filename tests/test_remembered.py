"""A validation remembered (remembered.remember / recall): a run keeps its validated spool
beside the ledger, and the next scan of the very same bytes reads it instead of validating
again. Derived, checked, never trusted over the manifest: other bytes, damage, another
version, a file that is not ours, or a pipe all mean a fresh validation."""

from __future__ import annotations

import ast
import importlib.util
import os
import stat
import tempfile
from pathlib import Path

import orjson
import pytest

from tests.conftest import SandboxProc, cli_env, ledger_records, names, run_worker, write_manifest
from worker.manifest import remembered, spool
from worker.manifest.remembered import recall, remember, remembered_path
from worker.manifest.source import scan
from worker.manifest.values import Group, Invalid, Scan

MIXED = (
    '{"Name": "Good1", "Tags": [{"Key": "k", "Value": "v", "Category": "Custom"}]}\n'
    "\n"
    '{"Name": "bad name"}\n'
    '{"Name": "Good2", "ProjectName": "p"}\n'
    "[]\n"
    '{"Name": "Good1"}\n'
)


def items_of(result: Scan) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for item in spool.read(result):
        if isinstance(item, Group):
            out.append(("G", item.name, item.line, item.body, item.fingerprint))
        else:
            assert isinstance(item, Invalid)
            out.append(("!", item.name, item.line, str(item.problem)))
    return out


def scanned_and_remembered(tmp_path: Path, text: str = MIXED) -> tuple[Path, Path, Scan]:
    source = tmp_path / "m.jsonl"
    source.write_text(text, encoding="utf-8")
    kept = remembered_path(tmp_path / "m.ledger.jsonl")
    fresh = scan(source, spool_dir=tmp_path)
    assert remember(fresh, kept) is None
    return source, kept, fresh


def test_a_recalled_scan_yields_exactly_what_the_validation_did(tmp_path: Path) -> None:
    """Groups (bodies, fingerprints, lines), invalid lines, duplicates, counts and problems:
    all as the fresh scan found them, and the problems name the manifest's path now."""
    source, kept, fresh = scanned_and_remembered(tmp_path)
    with fresh, recall(source, kept) as again:  # type: ignore[union-attr]
        assert again.recalled and not fresh.recalled
        assert items_of(again) == items_of(fresh)
        assert (again.sha256, again.size, again.groups, again.invalid) == (
            fresh.sha256,
            fresh.size,
            fresh.groups,
            fresh.invalid,
        )
        assert again.problem_count == fresh.problem_count == 3
        assert [str(p) for p in again.problems] == [str(p) for p in fresh.problems]
        assert items_of(again) == items_of(again)  # every pass reads it afresh
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_a_renamed_manifest_with_the_same_bytes_is_named_by_its_new_path(tmp_path: Path) -> None:
    source, kept, fresh = scanned_and_remembered(tmp_path)
    fresh.close()
    moved = source.rename(tmp_path / "renamed.jsonl")
    again = recall(moved, kept)
    assert again is not None
    with again:
        assert all(str(p).startswith(f"{moved}:") for p in again.problems)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda b: b + b'{"Name": "Good3"}\n', id="appended"),
        pytest.param(lambda b: b.replace(b"Good2", b"Good9"), id="same-size-edit"),
        pytest.param(lambda b: b[:-1], id="cut"),
    ],
)
def test_other_bytes_are_validated_afresh(tmp_path: Path, edit: object) -> None:
    source, kept, fresh = scanned_and_remembered(tmp_path)
    fresh.close()
    assert callable(edit)
    source.write_bytes(edit(source.read_bytes()))
    assert recall(source, kept) is None


@pytest.mark.parametrize("where", ["records", "header", "truncated", "empty", "version"])
def test_a_damaged_or_foreign_spool_is_not_used(tmp_path: Path, where: str) -> None:
    source, kept, fresh = scanned_and_remembered(tmp_path)
    fresh.close()
    data = bytearray(kept.read_bytes())
    if where == "records":
        data[-3] ^= 0x01  # one bit in the last record's body
    elif where == "header":
        data[0:1] = b"["
    elif where == "truncated":
        del data[-10:]
    elif where == "empty":
        data = bytearray()
    else:
        data = bytearray(bytes(data).replace(b'"rules":"', b'"rules":"9', 1))
    kept.write_bytes(bytes(data))
    assert recall(source, kept) is None


def test_every_header_field_is_sealed_with_the_records(tmp_path: Path) -> None:
    """A header edited consistently (a count, a problem) is refused as surely as a damaged
    record: the seal covers both. Otherwise one bit (problem_count 1 -> 0) would let a run
    without --skip-invalid send the valid lines of an invalid manifest."""
    source, kept, fresh = scanned_and_remembered(tmp_path)
    fresh.close()
    head, _, records = kept.read_bytes().partition(b"\n")
    for field, value in (("problem_count", 0), ("groups", 1), ("problems", [])):
        meta = orjson.loads(head)
        meta[field] = value
        kept.write_bytes(orjson.dumps(meta) + b"\n" + records)
        assert recall(source, kept) is None, field
    kept.write_bytes(head + b"\n" + records)
    intact = recall(source, kept)
    assert intact is not None
    intact.close()


def test_other_validation_rules_validate_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool is keyed on the code that validates, not only the version number: an
    upgrade that changes a rule (and keeps 0.2.0) must not reuse a verdict of the old rule."""
    source, kept, fresh = scanned_and_remembered(tmp_path)
    fresh.close()
    monkeypatch.setattr(remembered, "_rules", lambda: "another rule set")
    assert recall(source, kept) is None
    monkeypatch.setattr(remembered, "_rules", lambda: None)  # code that cannot be read
    assert recall(source, kept) is None
    with scan(source) as again:
        assert remember(again, kept) == "the validation code cannot be read"


def _worker_imports(module: Path) -> set[str]:
    """The worker modules `module` imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("worker"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(
                    sub
                    if importlib.util.find_spec(node.module) and _is_module(sub)
                    else node.module
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("worker"))
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_the_rules_cover_every_module_the_manifest_step_imports() -> None:
    """Every module the manifest package's code calls on is in the remembered rules, so a
    rule moved to another module (the API's rules to worker/api/...) is still digested:
    only the exception tree (worker.errors) and the version (digested on its own) are not."""
    rules = {path.resolve() for path in remembered.rule_files()}
    package = Path(remembered.__file__).parent
    assert {p.resolve() for p in package.glob("*.py")} <= rules
    imported = set().union(*(_worker_imports(p) for p in package.glob("*.py")))
    for name in sorted(imported - {"worker", "worker.errors"}):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        assert Path(spec.origin).resolve() in rules, name


def test_a_change_to_any_rule_file_changes_the_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules digest every byte of every rule file: changing any one of them (even
    the last byte) makes another digest, so a spool of the old code is not recalled."""
    copies = []
    for i, path in enumerate(remembered.rule_files()):
        copy = tmp_path / f"{i}" / path.name
        copy.parent.mkdir()
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(remembered, "rule_files", lambda: copies)
    digest = remembered._rules.__wrapped__
    before = digest()
    assert before is not None and digest() == before
    for copy in copies:
        text = copy.read_bytes()
        copy.write_bytes(text + b"#")
        assert digest() != before, copy.name
        copy.write_bytes(text)
    assert digest() == before


def test_the_spool_costs_its_records_and_a_short_header(tmp_path: Path) -> None:
    _source, kept, fresh = scanned_and_remembered(tmp_path, MIXED * 200)
    fresh.close()
    records = kept.read_bytes().partition(b"\n")[2]
    assert kept.stat().st_size - len(records) < 8192  # not a fixed 1 MiB


def test_a_spool_is_not_kept_when_the_disk_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger needs the room more: a spool that would leave less free space than its own
    size (or 64 MiB) is not written, and the reason is given."""
    source = tmp_path / "m.jsonl"
    source.write_text(MIXED, encoding="utf-8")
    real = os.statvfs(tmp_path)

    class Full:
        f_frsize = real.f_frsize
        f_bavail = (32 << 20) // real.f_frsize  # 32 MiB free

    monkeypatch.setattr(os, "statvfs", lambda _: Full)
    with scan(source) as fresh:
        why = remember(fresh, tmp_path / "m.spool")
    assert why is not None and why.startswith("it would leave 31 MiB free")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_a_copy_cut_short_leaves_no_scratch_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal in the middle of the copy removes the scratch copy and goes on being a
    signal; scratch copies a killed process left are removed by the next remember."""
    source = tmp_path / "m.jsonl"
    source.write_text(MIXED, encoding="utf-8")
    kept = tmp_path / "m.spool"
    left = tmp_path / ".m.spool.k1ll3d"
    left.write_bytes(b"half a copy")

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    with scan(source) as fresh:
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", interrupted)
            with pytest.raises(KeyboardInterrupt):
                remember(fresh, kept)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # both gone
        assert remember(fresh, kept) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "m.spool"]


def test_a_spool_that_is_not_ours_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's file, a symbolic link (even to a good spool), a directory: not used."""
    source, kept, fresh = scanned_and_remembered(tmp_path)
    fresh.close()
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)
    assert recall(source, kept) is None
    monkeypatch.undo()
    mine = recall(source, kept)
    assert mine is not None  # the same file is used when it is ours
    mine.close()
    link = tmp_path / "link.spool"
    link.symlink_to(kept)
    assert recall(source, link) is None
    folder = tmp_path / "dir.spool"
    folder.mkdir()
    assert recall(source, folder) is None
    assert recall(source, tmp_path / "missing.spool") is None


def test_a_pipe_is_never_recalled_or_opened(tmp_path: Path) -> None:
    """A FIFO is read once, by `scan`: recall does not even open it (opening and closing it
    would wake its writer into a pipe with no reader)."""
    _source, kept, fresh = scanned_and_remembered(tmp_path)
    fresh.close()
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert recall(fifo, kept) is None
    # No reader ever opened it: a non-blocking writer still finds none.
    with pytest.raises(OSError) as info:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == 6  # ENXIO: no reader


def test_a_spool_that_cannot_be_kept_is_not_an_error(tmp_path: Path) -> None:
    source = tmp_path / "m.jsonl"
    source.write_text(MIXED, encoding="utf-8")
    with scan(source) as fresh:
        assert (
            remember(fresh, tmp_path / "no-such-folder" / "m.spool") == "No such file or directory"
        )
        (tmp_path / "taken.spool").mkdir()
        assert remember(fresh, tmp_path / "taken.spool") == "Is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "taken.spool"]


# -- through the real CLI --------------------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_of_the_same_manifest_skips_the_validation_and_an_edit_does_not(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", names(5))
    ledger = tmp_path / "m.ledger.jsonl"
    env = cli_env(tmp_path)
    args = ("run", str(manifest), "--endpoint", sandbox.url, "--log-format", "json")
    first = run_worker(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "manifest.unchanged" not in first.stderr
    kept = Path(f"{ledger}.spool")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600

    again = run_worker(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert "manifest.unchanged" in again.stderr
    assert len(sandbox.creates()) == 5  # nothing sent again

    # An edit is validated: a bad line is refused before anything is sent (exit 2)...
    with manifest.open("a", encoding="utf-8") as f:
        f.write('{"Name": "bad name"}\n')
    bad = run_worker(*args, env=env)
    assert bad.returncode == 2, bad.stderr
    assert f"{manifest}:6: Name:" in bad.stderr
    assert "manifest.unchanged" not in bad.stderr
    # ...and a good one is created.
    write_manifest(manifest, [*names(5), {"Name": "Extra1"}])
    good = run_worker(*args, env=env)
    assert good.returncode == 0, good.stderr
    assert "manifest.unchanged" not in good.stderr
    assert [c["name"] for c in sandbox.creates()][5:] == ["Extra1"]
    assert ledger_records(ledger)[-1]["type"] == "end"


@pytest.mark.slow
def test_a_damaged_spool_is_validated_afresh_and_a_dry_run_keeps_none(
    sandbox: SandboxProc, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", names(3))
    env = cli_env(tmp_path)
    args = ("run", str(manifest), "--endpoint", sandbox.url, "--log-format", "json")
    dry = run_worker(*args, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert not list(tmp_path.glob("*.spool"))  # a dry run writes nothing
    assert run_worker(*args, env=env).returncode == 0
    kept = tmp_path / "m.ledger.jsonl.spool"
    head, _, records = kept.read_bytes().partition(b"\n")
    meta = orjson.loads(head)
    kept.write_bytes(head + b"\n" + records.replace(b"00000", b"00009"))  # same size
    assert meta["records_bytes"] == len(records)
    again = run_worker(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert "manifest.unchanged" not in again.stderr
    assert len(sandbox.creates()) == 3  # the true manifest, all done: nothing sent
    assert "manifest.unchanged" in run_worker(*args, env=env).stderr  # remembered anew


def test_a_ledger_folder_that_cannot_be_written_gets_its_spool_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run or a check may look at a ledger in a read-only folder: the manifest's
    private spool then goes to the temporary directory instead of failing the scan."""
    from worker.manifest import load
    from worker.settings import Settings

    source = tmp_path / "m.jsonl"
    source.write_text(MIXED, encoding="utf-8")
    ledger = tmp_path / "ro" / "m.ledger.jsonl"
    ledger.parent.mkdir()
    settings = Settings(manifest=source, ledger=ledger)
    with load.scan_manifest(settings.manifest, settings.ledger) as beside:
        assert beside.spool_dir == str(ledger.parent)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == ledger.parent else real_access(p, mode)
    )
    with load.scan_manifest(settings.manifest, settings.ledger) as elsewhere:
        assert elsewhere.spool_dir == tempfile.gettempdir()
        assert elsewhere.groups == beside.groups
