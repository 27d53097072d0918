"""The pure logic, without a database: settings, templates, backoff, claims, the outcome
classifier's non-database cases, and batches' accounting."""

from __future__ import annotations

import pytest
from autoembed.config import Settings
from autoembed.errors import ConfigError, LLMModelMissing, LLMTimeout, LLMUnavailable, PromptError
from autoembed.lanes import Batch, backoff
from autoembed.outcomes import Outcome, classify, is_client_error, is_outage
from autoembed.queue import Claims, Job
from autoembed.templates import fields, render


def job(i: int, token: str = "w#1") -> Job:
    return Job(id=i, watch_id=1, pk=str(i), generation=1, attempts=0, kind="fresh", token=token)


def test_settings_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://x/y",
            "AUTOEMBED_BATCH_SIZE": "64",
            "AUTOEMBED_LEASE_SECONDS": "2.5",
            "AUTOEMBED_DEVICE": "cpu",
        }
    )
    assert (s.database_url, s.batch_size, s.lease_seconds, s.device) == (
        "postgresql://x/y",
        64,
        2.5,
        "cpu",
    )
    assert s.worker_name  # host:pid by default
    with pytest.raises(ConfigError, match="AUTOEMBED_BATCH_SIZE='many' is not a number"):
        Settings.from_env({"AUTOEMBED_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        Settings.from_env({"AUTOEMBED_BATCH_SIZE": "0"})
    with pytest.raises(ConfigError, match="device must be auto, cpu or cuda"):
        Settings(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings().require_database()


def test_templates_render_by_position() -> None:
    assert fields("{title}: {body} ({title})") == ["title", "body"]
    assert render("{title}: {body} ({title})", ["T", "B"]) == "T: B (T)"
    assert render("{{literal}} {a}", [None]) == "{literal} "  # NULL renders as ""
    for bad, message in (
        ("{a", "malformed"),
        ("{a.b}", "must name a column"),
        ("no columns", "uses no column"),
    ):
        with pytest.raises(PromptError, match=message):
            fields(bad)
    with pytest.raises(PromptError, match="template"):
        render("{a:d}", ["not a number"])
    with pytest.raises(PromptError, match="uses 1 column"):
        render("{a}", ["x", "y"])


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    s = Settings(backoff_seconds=2, backoff_max_seconds=10)
    for attempts, (low, high) in {0: (1, 3), 1: (2, 6), 2: (4, 12), 10: (5, 15)}.items():
        for _ in range(50):
            assert low <= backoff(s, attempts) <= high


def test_claims_and_batches_account_for_each_job_once() -> None:
    claims = Claims()
    jobs = [job(1), job(2), job(3, "w#2")]
    claims.add(jobs)
    assert len(claims) == 3 and claims.ids() == {1, 2, 3}
    batch = Batch.of("embed", jobs, claims)
    assert batch.take([jobs[0], jobs[0]]) == [jobs[0]]  # once, however often it is ended
    assert batch.take([jobs[0]]) == []
    assert len(claims) == 2 and [j.id for j in batch.jobs()] == [2, 3]
    batch.take(batch.jobs())
    assert not claims and not batch.open


def test_outcomes_of_what_is_not_the_database() -> None:
    assert classify(LLMUnavailable("refused")) is Outcome.OUTAGE
    assert classify(LLMTimeout("slow")) is Outcome.RETRY
    assert classify(LLMModelMissing("absent")) is Outcome.FAIL
    assert classify(PromptError("broken")) is Outcome.FAIL
    assert classify(ConnectionResetError()) is Outcome.OUTAGE
    # a file the model cache cannot write is not a database outage
    assert not is_outage(PermissionError("/root/.cache"))
    assert classify(PermissionError("/root/.cache")) is Outcome.RETRY
    assert not is_client_error(ValueError("x"))
