"""`scan-export bench NAME`: one module per bench behind one table, and the spellings from before the
subcommands (`bench --ssd`, plain `bench` for the scan) as aliases of them."""

import argparse
import json

import pytest

from scan_export.bench import BENCHES, DEFAULT
from scan_export.cli import build_parser, main


def _bench_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"].benches


def test_every_bench_of_the_table_is_a_subcommand_with_documented_flags():
    parsers = _bench_parsers()
    assert set(parsers) == set(BENCHES) == {"scan", "ssd", "model", "export-memory"}
    for name, p in parsers.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"bench {name} {action.option_strings} has no help text"
            if action.default not in (None, False) and not action.required:
                assert "default" in p._get_formatter()._get_help_string(action), (name, action.dest)


@pytest.mark.parametrize("old, new", [
    ([], ["scan"]),
    (["--regime", "easy", "--plain"], ["scan", "--regime", "easy", "--plain"]),
    (["--ssd", "--repeats", "2"], ["ssd", "--repeats", "2"]),
    (["--repeats", "2", "--ssd"], ["ssd", "--repeats", "2"]),
    (["--model", "--model-type", "mamba2", "--configs", "tiny"], ["model", "--model-type", "mamba2", "--configs", "tiny"]),
    (["--export-memory"], ["export-memory"]),
])
def test_old_spellings_parse_as_the_subcommand(old, new):
    parser = build_parser()
    assert vars(parser.parse_args(["bench", *old])) == vars(parser.parse_args(["bench", *new]))
    assert parser.parse_args(["bench", *old]).bench == (new[0] if new else DEFAULT)


def test_defaults_are_the_old_ones():
    parser = build_parser()
    scan = parser.parse_args(["bench"])
    assert (scan.regime, scan.repeats, scan.chunk_size, scan.plain) == ("init", 5, None, False)
    model = parser.parse_args(["bench", "model"])
    assert (model.repeats, model.configs, model.model_type, model.prefill_len, model.decode_tokens) == \
        (3, "tiny,130m", "mamba", 512, 32)


def _small_ssd(monkeypatch):
    import scan_export.bench.ssd as ssd

    real = ssd.bench_ssd
    monkeypatch.setattr(ssd, "bench_ssd", lambda **kw: real(shape=(1, 2, 4, 8, 40), **kw))


def test_subcommand_and_alias_print_the_same_report(monkeypatch, tmp_path, capsys):
    _small_ssd(monkeypatch)
    assert main(["bench", "ssd", "--repeats", "1", "--json", str(tmp_path / "new.json")]) == 0
    new = capsys.readouterr().out
    assert main(["bench", "--ssd", "--repeats", "1", "--json", str(tmp_path / "old.json")]) == 0
    old = capsys.readouterr().out

    def rows(text):  # the timings differ run to run; the rows and their names do not
        return [line.split("  ")[1] if line.startswith("  ") else line for line in text.splitlines()]

    assert rows(new) == rows(old) and "SSD scan" in new and len(new.splitlines()) == 6
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("new.json", "old.json"))
    assert a["written_by"] == b["written_by"] == "scan-export" and a["median_ms"].keys() == b["median_ms"].keys()


@pytest.mark.parametrize("argv, culprit, owner", [
    (["bench", "ssd", "--chunk-size", "8"], "--chunk-size", "bench scan"),
    (["bench", "--ssd", "--plain"], "--plain", "bench scan"),
    (["bench", "export-memory", "--repeats", "2"], "--repeats", "bench scan, ssd, model"),
    (["bench", "scan", "--quantize", "int4"], "--quantize", "bench model"),
    (["bench", "--export-memory", "--model"], "--model", "give one of them"),
])
def test_a_flag_of_another_bench_is_one_line(argv, culprit, owner, capsys):
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("scan-export: error: bench") and culprit in line and owner in line, line
