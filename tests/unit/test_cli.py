import os
import stat

import pytest

from rbee_p2p import __version__
from rbee_p2p.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rbee-node {__version__}"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rbee-node" in out and "RBEE_HOME" in out and "id" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: rbee-node" in capsys.readouterr().out


def test_id_creates_the_identity_under_rbee_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RBEE_HOME", str(tmp_path))
    assert main(["id"]) == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith("12D3KooW")
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert main(["id"]) == 0
    assert capsys.readouterr().out.strip() == first


def test_unsafe_key_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RBEE_HOME", str(tmp_path))
    main(["id"])
    os.chmod(tmp_path / "node.key", 0o644)
    assert main(["id"]) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_audit_since_takes_a_date_or_an_iso_datetime():
    import argparse

    from rbee_p2p.cli.audit import parse_since

    day = parse_since("2026-09-01")
    assert day == 1788220800000
    assert parse_since("2026-09-01T00:00:00") == day == parse_since("2026-09-01T02:00:00+02:00")
    assert parse_since("2026-09-01T00:00:01.5Z") == day + 1500
    with pytest.raises(argparse.ArgumentTypeError):
        parse_since("last week")


def test_audit_commands_need_an_action_and_a_tenant(capsys):
    with pytest.raises(SystemExit):
        main(["audit"])
    with pytest.raises(SystemExit):
        main(["audit", "export"])
    assert "--tenant" in capsys.readouterr().err
