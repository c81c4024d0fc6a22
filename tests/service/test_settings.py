"""Settings: env prefix, unknown keys refused, event mapping normalised, limits cross-checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.event_mapping import EventMapping
from service.schemas import EventIn
from service.settings import Settings


def test_env_prefix_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLARITY_PORT", "9123")
    monkeypatch.setenv("POLARITY_BUNDLE", "/models/b1")
    monkeypatch.setenv("POLARITY_EVENT_POLARITY", '{" Share ": 1, "skip": -1}')
    monkeypatch.setenv("POLARITY_API_KEY", "zebra-key-77")
    s = Settings()
    assert s.port == 9123 and s.bundle == Path("/models/b1") and s.reload_root == Path("/models")
    assert s.event_polarity == {"share": 1, "skip": -1}
    assert s.api_key is not None and s.api_key.get_secret_value() == "zebra-key-77"
    assert "zebra-key-77" not in repr(s)
    assert Settings(port=1).port == 1  # arguments win over the environment


def test_unknown_and_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(max_candidate=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="device"):
        Settings(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"polarity of event 'share' must be \+1 or -1"):
        Settings(event_polarity={"share": 2})
    with pytest.raises(ValidationError, match="key_prefix"):
        Settings(key_prefix="a{b}")
    with pytest.raises(ValidationError, match="microbatch_max_candidates"):
        Settings(microbatch_max_wait_us=100, microbatch_max_candidates=10, max_candidates=2000)


def test_event_mapping_rules() -> None:
    m = EventMapping(polarity=Settings().event_polarity)

    def row(**kw: object) -> EventIn:
        return EventIn.model_validate({"user_id": "u", "item_id": "i", "timestamp": 1.7e9, **kw})

    click = m.map(row(event=" CLICK "))
    assert click.event is not None and click.event.polarity == 1 and click.event.event == "click"
    skip = m.map(row(event="skip", event_id=None), default_event_id="1-0")
    assert skip.event is not None and skip.event.polarity == -1 and skip.event.event_id == "1-0"
    own_id = m.map(row(event="skip", event_id="mine"), default_event_id="1-0")
    assert own_id.event is not None and own_id.event.event_id == "mine"
    labelled = m.map(row(event="click", label=0))  # the label wins, as in the offline log reader
    assert labelled.event is not None and labelled.event.polarity == -1 and labelled.event.event == "click"
    label_only = m.map(row(label=1))
    assert label_only.event is not None and label_only.event.event == "positive"
    unknown = m.map(row(event="teleport"))
    assert unknown.event is None and unknown.reason is not None and "teleport" in unknown.reason
    assert m.map(row()).event is None


def test_a_misspelt_environment_variable_is_refused_naming_the_closest_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLARITY_REDIS_ULR", "redis://10.0.0.9:6379/0")
    with pytest.raises(ValidationError, match=r"unknown environment variable POLARITY_REDIS_ULR: did you mean "
                                              r"POLARITY_REDIS_URL\?"):
        Settings()
    monkeypatch.delenv("POLARITY_REDIS_ULR")
    monkeypatch.setenv("polarity_max_candidats", "5")  # the environment is read case-insensitively
    with pytest.raises(ValidationError, match=r"polarity_max_candidats: did you mean POLARITY_MAX_CANDIDATES\?"):
        Settings()
    monkeypatch.delenv("polarity_max_candidats")
    monkeypatch.setenv("POLARITY_TAPF_KERNEL", "off")  # read by export/custom_kernel.py: not a typo
    monkeypatch.setenv("POLARITY_MAX_CANDIDATES", "5")
    assert Settings().max_candidates == 5


def test_every_polarity_variable_the_project_reads_is_a_setting_or_listed() -> None:
    """The list of non-setting POLARITY_* variables must not rot: every name the sources mention is known."""
    import re

    from service.settings import ENV_PREFIX, OTHER_ENV_VARIABLES

    root = Path(__file__).resolve().parents[2]
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | set(OTHER_ENV_VARIABLES)
    sources = [p for d in ("model", "service", "export", "loadtest", "deploy", "tests") for p in (root / d).rglob("*")
               if p.suffix in {".py", ".yaml", ".yml", ".sh", ".toml"} or p.name.startswith("Dockerfile")]
    mentioned = {m for p in sources if p.is_file() for m in re.findall(r"POLARITY_[A-Z0-9_]*[A-Z0-9]", p.read_text())}
    mentioned -= {"POLARITY_REDIS_ULR", "POLARITY_MAX_CANDIDATS", "POLARITY_NO_SUCH_SETTING"}  # the typos tested here
    assert sorted(mentioned - known) == []
