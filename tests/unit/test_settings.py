"""Settings come from .env (and the environment), strictly, with secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsek_remote.errors import SettingsError
from sparsek_remote.settings import load_settings

CANARY = "canary-passphrase-7f3a"


def _env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_no_env_file_means_local(workdir: Path) -> None:
    settings = load_settings(workdir / ".env")
    assert settings.hosts == {}
    assert settings.default_target == "local"


def test_hosts_parse_with_nested_keys(workdir: Path) -> None:
    settings = load_settings(_env(workdir, (
        "SPARSEK_DEFAULT_TARGET=lab\n"
        "SPARSEK_HOSTS__LAB__ADDRESS=198.51.100.7\n"
        "SPARSEK_HOSTS__LAB__USER=ubuntu\n"
        "SPARSEK_HOSTS__LAB__PORT=2222\n"
        f"SPARSEK_HOSTS__LAB__KEY_PASSPHRASE={CANARY}\n"
        "SPARSEK_HOSTS__B200-1__ADDRESS=b200.example.org\n")))
    assert sorted(settings.hosts) == ["b200-1", "lab"]
    lab = settings.host("lab")
    assert (lab.address, lab.user, lab.port) == ("198.51.100.7", "ubuntu", 2222)
    assert lab.key_passphrase.get_secret_value() == CANARY
    assert CANARY not in repr(settings) and CANARY not in str(settings)
    assert CANARY not in str(lab.public_view())


def test_process_environment_overrides_env_file(workdir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(workdir, "SPARSEK_HOSTS__LAB__ADDRESS=198.51.100.7\n")
    monkeypatch.setenv("SPARSEK_HOSTS__LAB__PORT", "2200")
    assert load_settings(env).host("lab").port == 2200


@pytest.mark.parametrize(("line", "expected"), [
    ("SPARSEK_HOSTS__LAB__PORT=abc", "SPARSEK_HOSTS__LAB__PORT"),
    ("SPARSEK_HOSTS__LAB__PORT=70000", "SPARSEK_HOSTS__LAB__PORT"),
    ("SPARSEK_HOSTS__LAB__USER=root;id", "SPARSEK_HOSTS__LAB__USER"),
    ("SPARSEK_HOSTS__LAB__HOST_KEY_FINGERPRINT=md5:aa", "HOST_KEY_FINGERPRINT"),
    ("SPARSEK_HOSTS__LAB__COLOUR=blue", "COLOUR: not a setting"),
    ("SPARSEK_DEFAULT_TARGET=nowhere", "not a configured host"),
    ("PASSWORD=hunter2", "PASSWORD: not a setting"),
])
def test_bad_values_name_the_key_and_hide_the_value(workdir: Path, line: str,
                                                    expected: str) -> None:
    env = _env(workdir, "SPARSEK_HOSTS__LAB__ADDRESS=198.51.100.7\n"
                        f"SPARSEK_HOSTS__LAB__KEY_PASSPHRASE={CANARY}\n{line}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    message = str(info.value)
    assert expected in message
    assert CANARY not in message
    assert "hunter2" not in message


def test_address_with_shell_characters_is_refused(workdir: Path) -> None:
    env = _env(workdir, "SPARSEK_HOSTS__LAB__ADDRESS=host;reboot\n")
    with pytest.raises(SettingsError, match="ADDRESS"):
        load_settings(env)


def test_unknown_host_has_a_hint(workdir: Path) -> None:
    settings = load_settings(workdir / ".env")
    with pytest.raises(SettingsError) as info:
        settings.host("lab")
    assert "SPARSEK_HOSTS__LAB__ADDRESS" in str(info.value)
