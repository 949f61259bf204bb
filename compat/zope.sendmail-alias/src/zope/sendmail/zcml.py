"""zope.sendmail.zcml: replaces itself by mailoutbox.zcml when imported."""
import sys

import mailoutbox.zcml

sys.modules[__name__] = mailoutbox.zcml
