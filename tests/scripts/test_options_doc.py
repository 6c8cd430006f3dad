"""docs/options.md: generated from the argument dataclasses (up to date), and every flag it documents, alias included,
is accepted by the parser `examples/run_diverse.py` builds."""

from __future__ import annotations

import re

import pytest
from fixtures.scripts import REPO
from transformers import HfArgumentParser

from diverse_vit_hf.scripts import options_doc, train

OPTIONS = REPO / "docs" / "options.md"


class Parsed(Exception):
    pass


def parse_like_main(monkeypatch, argv: list[str]) -> dict:
    """Every field `main` parses from `argv`, by name; fails on an unknown flag."""

    class RecordingParser(HfArgumentParser):
        def parse_args_into_dataclasses(self, *args, **kwargs):
            raise Parsed(super().parse_args_into_dataclasses(*args, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(train, "HfArgumentParser", RecordingParser)
        with pytest.raises(Parsed) as parsed:
            train.main(argv)
    *dataclasses, unknown = parsed.value.args[0]
    assert not unknown, f"not accepted: {unknown}"
    values = {}
    for instance in dataclasses:
        values.update(vars(instance))
    return values


def documented_rows() -> list[dict[str, str]]:
    """The rows of docs/options.md's tables: {"flag", "aliases", "type", "default"} (cells as written)."""
    rows, header = [], None
    for line in OPTIONS.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= {"-"}:
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def sample_value(row: dict[str, str]) -> tuple[str, object]:
    """A command-line value for a documented flag and what it parses to (None: only check that it is accepted)."""
    kind, default = row.get("type", ""), code_spans(row["default"])
    if kind.startswith("one of"):
        choice = code_spans(kind)[-1]
        return choice, choice
    if kind.split(" ")[0] == "bool":
        return "true", True
    if kind.split(" ")[0] == "int":
        return "3", 3
    if kind.split(" ")[0] == "float":
        return "0.25", 0.25
    if default and default[0] not in ("None", '""') and "type" in row:
        return default[0], default[0]  # a string with a default: checked by the dataclass (stop_signals)
    if "type" in row:
        return "some-name", "some-name"
    return default[0], None  # the table of changed defaults: the documented value


def test_options_md_is_generated_from_the_dataclasses():
    assert OPTIONS.read_text(encoding="utf-8") == options_doc.render_options(), (
        "docs/options.md is out of date: run python -m diverse_vit_hf.scripts.options_doc"
    )


def test_the_generator_writes_and_checks_the_file(tmp_path, capsys):
    path = tmp_path / "options.md"
    assert options_doc.main(["--output", str(path), "--check"]) == 1
    assert options_doc.main(["--output", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == options_doc.render_options()
    assert options_doc.main(["--output", str(path), "--check"]) == 0


def test_options_md_documents_every_field_with_its_help():
    rows = {row["flag"]: row for row in documented_rows() if "help" in row}
    fields = [name for section in options_doc.sections() for name in section_fields(section)]
    assert sorted(rows) == sorted(f"`--{name}`" for name in fields)
    assert all(row["help"] and row["type"] and row["default"] for row in rows.values())
    assert code_spans(rows["`--model_name_or_path`"]["aliases"]) == ["--model"]
    assert code_spans(rows["`--config_name`"]["aliases"]) == ["--model_config_name"]
    assert code_spans(rows["`--mixing`"]["aliases"]) == ["--no_mixing"]


def section_fields(section) -> list[str]:
    return [row["flag"].strip("`-") for row in options_doc.field_rows(section.dataclass_type, section.names)]


def test_every_documented_flag_and_alias_is_accepted_by_the_real_parser(monkeypatch, tmp_path):
    rows = documented_rows()
    assert len(rows) > 50
    for row in rows:
        name = code_spans(row["flag"])[0]
        field = name[2:]
        value, expected = sample_value(row)
        for flag in [name, *code_spans(row.get("aliases", ""))]:
            argv = [flag] if flag.startswith("--no_") else [flag, value]
            parsed = parse_like_main(monkeypatch, [*argv, "--output_dir", str(tmp_path), "--use_cpu"])
            if flag.startswith("--no_"):
                assert parsed[field] is False, flag
            elif expected is not None:
                assert parsed[field] == expected, (flag, parsed[field])
