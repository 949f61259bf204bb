"""zope.sendmail.mailer: replaces itself by mailoutbox.mailer when imported."""
import sys

import mailoutbox.mailer

sys.modules[__name__] = mailoutbox.mailer
