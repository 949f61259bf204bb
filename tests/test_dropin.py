"""mailoutbox as a drop-in for zope.sendmail: creating queues, the names
zope.sendmail's users import, and its behaviours with old components."""
from __future__ import annotations

import os

import pytest

from mailoutbox.maildir import Maildir


def mode(path):
    return os.stat(path).st_mode & 0o777


# -- Maildir(path, create=True) ------------------------------------------------

def test_create_missing_path(tmp_path):
    path = str(tmp_path / "queue")
    maildir = Maildir(path, create=True)
    assert maildir.created is True
    assert sorted(os.listdir(path)) == ["cur", "new", "tmp"]
    assert {mode(os.path.join(path, f)) for f in ("", "tmp", "new", "cur")} \
        == {0o700}
    # opening it again creates nothing
    assert Maildir(path, create=True).created is False
    assert Maildir(path).created is False


def test_create_in_empty_directory(tmp_path):
    """systemd's StateDirectory= makes the directory, empty."""
    path = tmp_path / "queue"
    path.mkdir(mode=0o755)
    maildir = Maildir(path, create=True)
    assert maildir.created is True
    assert sorted(os.listdir(path)) == ["cur", "new", "tmp"]
    assert mode(os.path.join(path, "new")) == 0o700


def test_create_completes_an_interrupted_creation(tmp_path):
    path = tmp_path / "queue"
    path.mkdir()
    (path / "tmp").mkdir()
    assert Maildir(path, create=True).created is True
    assert sorted(os.listdir(path)) == ["cur", "new", "tmp"]


def test_create_refuses_a_file(tmp_path):
    path = tmp_path / "queue"
    path.write_text("not a queue")
    with pytest.raises(ValueError, match=f"{path} is not a Maildir folder:"
                       " it is a file, not a mail queue"):
        Maildir(path, create=True)
    assert path.read_text() == "not a queue"


@pytest.mark.parametrize("intruder", ["notes.txt", "new", "failed"])
def test_create_refuses_a_directory_with_other_things(tmp_path, intruder):
    path = tmp_path / "project"
    path.mkdir()
    (path / intruder).write_text("mine")  # a *file* named new/tmp too
    with pytest.raises(ValueError, match=f"{path} is not a Maildir folder: "
                       "it is not a mail queue and not empty"):
        Maildir(path, create=True)
    assert os.listdir(path) == [intruder]


def test_open_without_create_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="missing is not a Maildir folder:"
                       " it is not a mail queue"):
        Maildir(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
