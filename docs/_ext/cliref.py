"""A Sphinx directive rendering the reference of the ``mailoutbox`` command.

``.. mailoutbox-cli-reference::`` inserts
:func:`mailoutbox.cli.reference.format_reference`: a section per subcommand,
with its usage and an ``option`` entry per argument, built from the same
parser the command uses.
"""
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


class CLIReference(SphinxDirective):
    has_content = False

    def run(self):
        from mailoutbox.cli.reference import format_reference

        text = format_reference()
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(
            self.state, StringList(text.splitlines(), "mailoutbox.cli"), container
        )
        return container.children


def setup(app):
    app.add_directive("mailoutbox-cli-reference", CLIReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
