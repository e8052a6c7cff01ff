"""Checks of the files a configuration names (shared/configchecks.py):
which private keys are warned about as readable by others, and how a
path tlshd.service hides is named."""

import os

import pytest

from tlshd.shared import configchecks


def key(tmp_path, mode):
    path = tmp_path / "key.pem"
    path.write_text("")
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o200, 0o4600])
def test_a_key_only_its_owner_can_use_is_fine(tmp_path, mode):
    assert configchecks.key_file_problem(key(tmp_path, mode),
                                         {os.geteuid()}) is None


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o610, 0o604, 0o602,
                                  0o601, 0o644, 0o666, 0o4601])
def test_any_group_or_other_bit_is_warned_about(tmp_path, mode):
    """Every one of the six group and other bits counts, each alone; the
    warning shows the mode as ls and chmod write it."""
    path = key(tmp_path, mode)
    problem = configchecks.key_file_problem(path, {os.geteuid()})
    assert problem == ("private key %s is readable or writable by group "
                       "or other (mode %04o); chmod 600 it" % (path, mode))


def test_a_key_owned_by_another_user_is_warned_about(tmp_path):
    path = key(tmp_path, 0o600)
    uid = os.stat(path).st_uid
    assert configchecks.key_file_problem(path, {uid + 1}) == (
        "private key %s is owned by uid %d, not by root or the worker "
        "user" % (path, uid))


def test_a_missing_key_is_left_to_the_loader(tmp_path):
    """No warning (and no exception) for a key that cannot be read:
    loading it reports that, as an error."""
    assert configchecks.key_file_problem(str(tmp_path / "none.pem"),
                                         {0}) is None


def test_a_hidden_path_is_named_as_written(monkeypatch):
    monkeypatch.setattr(configchecks, "SERVICE_HIDDEN",
                        (("/home", "ProtectHome=yes"),))
    assert configchecks.hidden_by_service("/home/u/k.pem") == (
        "/home/u/k.pem is under /home, which tlshd.service hides from the "
        "daemon (ProtectHome=yes)")


def test_a_link_into_a_hidden_path_names_both(tmp_path, monkeypatch):
    """A key reached through a link is hidden if its target is; the
    warning names the link as written and where it leads."""
    monkeypatch.setattr(configchecks, "SERVICE_HIDDEN",
                        (("/home", "ProtectHome=yes"),))
    link = tmp_path / "key.pem"
    link.symlink_to("/home/u/k.pem")
    assert configchecks.hidden_by_service(str(link)) == (
        "%s (a link to /home/u/k.pem) is under /home, which tlshd.service "
        "hides from the daemon (ProtectHome=yes)" % link)
    assert configchecks.hidden_by_service(str(tmp_path)) is None
