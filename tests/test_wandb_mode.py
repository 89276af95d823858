"""W&B modes mean what W&B users expect: WANDB_MODE, when set, decides; online needs an API key, found up front."""

from __future__ import annotations

import pytest

from deepdelta.loggers import WandbLogger, find_wandb_api_key, wandb_mode

KEYS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No W&B settings and an empty home: no key anywhere."""
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


@pytest.mark.parametrize(
    "env, offline, want",
    [(None, True, "offline"), (None, False, "online"), ("online", True, "online"), ("offline", False, "offline"),
     ("disabled", True, "disabled"), ("dryrun", False, "offline"), ("ONLINE", True, "online")],
)  # fmt: skip
def test_wandb_mode_is_wandb_mode_when_set_else_the_config(clean_env, env, offline, want):
    if env is not None:
        clean_env.setenv("WANDB_MODE", env)
    assert wandb_mode(offline) == want


def test_logger_goes_online_with_wandb_mode_online_and_passes_no_anonymous(clean_env, tmp_path):
    """Lightning's WandbLogger(offline=True) overwrote WANDB_MODE=online with offline; and it passed wandb the
    deprecated `anonymous` setting, which printed a warning on every run."""
    clean_env.setenv("WANDB_MODE", "online")
    logger = WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    assert logger._offline is False and "anonymous" not in logger._wandb_init
    clean_env.delenv("WANDB_MODE")
    assert WandbLogger(project="p", save_dir=str(tmp_path), offline=True)._offline is True  # the default


def test_api_key_is_found_in_the_environment_or_netrc(clean_env, tmp_path):
    assert find_wandb_api_key() is None
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert find_wandb_api_key() == str(netrc)
    clean_env.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a W&B server of one's own: its own entry
    assert find_wandb_api_key() is None
    clean_env.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert find_wandb_api_key() == "WANDB_API_KEY"
