import os
import stat

import pytest

from rbee_p2p import config
from rbee_p2p.errors import KeyFileError
from rbee_p2p.store.keys import load_or_create_key


def test_created_once_with_private_modes(tmp_path):
    path = tmp_path / "home" / "node.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_key(path).peer_id == key.peer_id  # the same identity next time
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_a_key_readable_by_others(tmp_path, mode):
    path = tmp_path / "node.key"
    load_or_create_key(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_key(path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_corrupted_key_is_an_error_never_a_new_identity(tmp_path, content):
    path = tmp_path / "node.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not a valid node key"):
        load_or_create_key(path)
    assert path.read_bytes() == content  # untouched


def test_a_non_ed25519_key_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "node.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        load_or_create_key(path)


def test_data_dir_from_rbee_home(tmp_path):
    assert config.data_dir({"RBEE_HOME": str(tmp_path)}) == tmp_path
    assert str(config.data_dir({})).endswith(".local/share/rbee")
