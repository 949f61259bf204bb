"""The ``zope.sendmail`` package name, served by mailoutbox.

Each module of zope.sendmail 7.3 is here a stub that replaces itself, in
``sys.modules``, by the mailoutbox module of the same role, so that
``zope.sendmail.delivery`` *is* ``mailoutbox.delivery`` (one module, one set
of classes and globals).  ``meta.zcml`` and ``configure.zcml`` include
mailoutbox's.  The ``zope-sendmail`` script is
``zope.sendmail.queue.run``, as in zope.sendmail.

The package cannot work beside the zope.sendmail distribution, which owns
the same files: importing it while zope.sendmail is installed raises
:class:`ImportError` saying what to do.
"""
from __future__ import annotations

import importlib.metadata

__all__ = ["MODULES"]

#: zope.sendmail's module name -> the mailoutbox module it is.
MODULES = {
    "delivery": "mailoutbox.delivery",
    "interfaces": "mailoutbox.interfaces",
    "maildir": "mailoutbox.maildir",
    "mailer": "mailoutbox.mailer",
    "queue": "mailoutbox.queue",
    "vocabulary": "mailoutbox.vocabulary",
    "zcml": "mailoutbox.zcml",
}


def _check_not_beside_zope_sendmail() -> None:
    try:
        real = importlib.metadata.distribution("zope.sendmail")
    except importlib.metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"zope.sendmail {real.version} is installed beside"
        " mailoutbox-zope-sendmail, and both own the files of zope/sendmail/."
        " Run 'pip uninstall zope.sendmail', then 'pip install"
        " --force-reinstall --no-deps mailoutbox-zope-sendmail' (from"
        " mailoutbox's compat/zope.sendmail-alias folder)."
    )


_check_not_beside_zope_sendmail()

