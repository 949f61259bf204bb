"""zope.sendmail.interfaces: replaces itself by mailoutbox.interfaces when imported."""
import sys

import mailoutbox.interfaces

sys.modules[__name__] = mailoutbox.interfaces
