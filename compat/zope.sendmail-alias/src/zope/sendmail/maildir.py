"""zope.sendmail.maildir: replaces itself by mailoutbox.maildir when imported."""
import sys

import mailoutbox.maildir

sys.modules[__name__] = mailoutbox.maildir
