"""zope.sendmail.delivery: replaces itself by mailoutbox.delivery when imported."""
import sys

import mailoutbox.delivery

sys.modules[__name__] = mailoutbox.delivery
