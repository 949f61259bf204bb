"""zope.sendmail.vocabulary: replaces itself by mailoutbox.vocabulary when imported."""
import sys

import mailoutbox.vocabulary

sys.modules[__name__] = mailoutbox.vocabulary
