"""NBDSRV_POLL_US sets how long a connection waits for a mapping client's next request."""

import pytest

from nbdsrv.config.security import poll_window_from_environment
from nbdsrv.errors import ConfigError
from nbdsrv.net.limits import POLL_WINDOW


@pytest.mark.parametrize(
    ("text", "seconds"), [(None, POLL_WINDOW), ("0", 0.0), ("120", 120e-6), ("7.5", 7.5e-6)]
)
def test_the_window_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, text: str | None, seconds: float
) -> None:
    if text is None:
        monkeypatch.delenv("NBDSRV_POLL_US", raising=False)
    else:
        monkeypatch.setenv("NBDSRV_POLL_US", text)
    assert poll_window_from_environment() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "-1", "20000", ""])
def test_a_bad_window_is_refused_with_one_sentence(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("NBDSRV_POLL_US", text)
    with pytest.raises(ConfigError, match="NBDSRV_POLL_US"):
        poll_window_from_environment()
