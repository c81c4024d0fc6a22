"""The `polarity` command as a user meets it: every --help shows its defaults, real choices, errors that
name the bad key, --version, progress only where it is readable, evaluate's slices printed and saved,
loadtest's exit code."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from bundle_factory import BuiltBundle

from loadtest.commands import load_failure
from loadtest.harness.redis_server import free_port
from model.cli import build_parser, main
from model.models.config import ARCHS, SEQ_VARIANTS
from model.progress import DEFAULT_INTERVAL_S, LineProgress, configure_progress, progress_bar


@pytest.fixture(autouse=True)
def _default_progress_style(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option in --help
    yield
    configure_progress(enabled=True, interval_s=DEFAULT_INTERVAL_S)


def _help_blocks(text: str) -> dict[str, str]:
    """--help's options section: option string -> its whole (unwrapped) help."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-[-\w]+(?:, -[-\w]+)?)", line)
        if m:
            current = m.group(1).split(", ")[-1]
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
    return blocks


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", _commands())
def test_every_option_of_every_command_shows_its_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    blocks = _help_blocks(capsys.readouterr().out)
    assert blocks, command
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    required = {s for a in sub.choices[command]._actions if a.required for s in a.option_strings}  # type: ignore[index]
    for option, text in blocks.items():
        if option in ("--help",):
            continue
        if option in required:
            assert "(default: none)" not in text, f"{command} {option}: required, yet shows a default: {text}"
        else:
            assert "default" in text, f"polarity {command} {option} does not say its default: {text}"
            assert text.count("(default") <= 1, f"polarity {command} {option} says its default twice: {text}"


def test_the_top_level_help_shows_defaults_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    blocks = _help_blocks(capsys.readouterr().out)
    assert "(default: 10.0)" in blocks["--progress-every"] and "--quiet" in blocks


def test_arch_and_seq_offer_their_real_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    blocks = _help_blocks(capsys.readouterr().out)
    assert "{" + ",".join(ARCHS) + "}" in blocks["--arch"] and "(default: onetrans)" in blocks["--arch"]
    assert "{" + ",".join(SEQ_VARIANTS) + "}" in blocks["--seq"] and "(default: mix-tapf)" in blocks["--seq"]
    with pytest.raises(SystemExit) as done:
        main(["train", "--data", "x.csv", "--out", "o", "--arch", "gpt"])
    assert done.value.code == 2 and "invalid choice: 'gpt'" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "named"), [
    ('{"n_layerz": 3}', "unknown key(s) ['n_layerz']"),
    ('{"n_layers": "3"}', "'n_layers' must be an integer, got '3'"),
    ('{"event_embedding": 1}', "'event_embedding' must be true or false"),
    ('{"head_hidden": [64, 32.5]}', "'head_hidden' must be a list of integers"),
    ('{"aggregate": "last"}', "aggregate must be one of ('all', 'final'), got 'last'"),
    ('{"attention_hidden": 8}', "unknown key(s) ['attention_hidden'] for arch 'onetrans'"),
])
def test_model_override_errors_name_the_bad_key(overrides: str, named: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "run"),
                 "--model-overrides", overrides])
    err = capsys.readouterr().err
    assert code == 2 and named in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"polarity {version('polarity')}"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_lines_elsewhere_and_nothing_when_quiet() -> None:
    term = _Terminal()
    bar = progress_bar(total=100, desc="train", unit="sample", stream=term)
    assert not isinstance(bar, LineProgress)
    bar.update(100)
    bar.close()
    assert "\r" in term.getvalue() and "100/100" in term.getvalue()  # tqdm redraws in place

    configure_progress(enabled=True, interval_s=1e-9)  # a line per update
    log = io.StringIO()
    lines = progress_bar(total=300, desc="evaluate test", unit="sample", stream=log)
    assert isinstance(lines, LineProgress)
    for _ in range(3):
        lines.update(100)
    lines.set_postfix(loss="0.5000")
    lines.close()
    out = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(out) == 4
    assert out[0].startswith("evaluate test: 100/300 samples (33%), ")
    assert out[-1].startswith("evaluate test: 300/300 samples (100%), ") and "loss=0.5000" in out[-1]
    assert re.search(r" in \d+\.\ds$", out[-1])

    configure_progress(enabled=True, interval_s=3600)  # none until close
    log = io.StringIO()
    slow = progress_bar(total=10, desc="x", stream=log)
    slow.update(5)
    assert log.getvalue() == ""
    slow.close()
    assert log.getvalue().startswith("x: 5/10 its (50%)")

    configure_progress(enabled=False)  # polarity --quiet
    quiet, term = io.StringIO(), _Terminal()
    for stream in (quiet, term):
        silent = progress_bar(total=10, desc="x", stream=stream)
        silent.update(10)
        silent.close()
    assert quiet.getvalue() == term.getvalue() == ""


@pytest.mark.slow
def test_evaluate_prints_and_saves_its_slices_and_never_overwrites_without_force(
        tiny_bundle: BuiltBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tiny_bundle.run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    for row in ("| test  | activity 0-1 positives", "| test  | activity 51+ positives", "| test  | cold items",
                "| valid | warm items"):
        assert row in printed.out, printed.out
    assert "evaluate test: " in printed.err and "(100%)" in printed.err  # the progress line (not a terminal)
    saved = json.loads(out.read_text())
    assert set(saved["test"]["by_activity"]) == {"0-1", "2-10", "11-50", "51+"}
    assert set(saved["test"]["by_item"]) == {"cold", "warm"}
    warm_n = saved["test"]["by_item"]["warm"]["n"]
    assert re.search(rf"\| test  \| warm items +\| .* \| +{warm_n:,} \|", printed.out)
    assert sum(s["n"] for s in saved["test"]["by_item"].values()) == saved["test"]["n"]

    before = out.read_text()
    assert main(["evaluate", str(tiny_bundle.run_dir), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == before
    assert main(["--quiet", "evaluate", str(tiny_bundle.run_dir), "--out", str(out), "--force"]) == 0
    assert "evaluate test" not in capsys.readouterr().err
    assert json.loads(out.read_text())["test"] == saved["test"]


def test_loadtest_fails_when_every_request_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = main(["loadtest", "--url", nobody, "--rate", "20", "--duration", "0.3", "--candidates", "3",
                 "--out", str(tmp_path / "load.json")])
    assert code == 1
    assert "every request failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "load.json").read_text())["completed_ok"] == 0


@pytest.mark.parametrize(("ok", "errors", "limit", "verdict"), [
    (100, 0, 0.01, None), (99, 1, 0.01, None), (98, 2, 0.01, "2.0% of requests failed"),
    (0, 5, 0.5, "every request failed"), (0, 0, 0.01, "no request was sent"), (50, 50, 0.6, None),
])
def test_load_failure_threshold(ok: int, errors: int, limit: float, verdict: str | None) -> None:
    found = load_failure({"completed_ok": ok, "error_count": errors, "errors": {"http_503": errors}},
                         max_error_share=limit)
    assert (found is None) if verdict is None else (found is not None and verdict in found)
