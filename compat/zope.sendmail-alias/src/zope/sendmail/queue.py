"""zope.sendmail.queue: replaces itself by mailoutbox.queue when imported."""
import sys

import mailoutbox.queue

sys.modules[__name__] = mailoutbox.queue
