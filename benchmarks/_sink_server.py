"""An aiosmtpd server that accepts and discards every message.

It advertises PIPELINING like the relays it stands for.

Usage: python _sink_server.py PORT [TLS_DIR]
"""
import asyncio
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP


class Discard:
    """Accept and forget every message; advertise PIPELINING (RFC 2920), as
    production relays such as Postfix do.  aiosmtpd reads commands one at a
    time from the stream, so pipelined commands are answered in order."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


def main() -> None:
    port = int(sys.argv[1])
    context = None
    if len(sys.argv) > 2:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(
            os.path.join(sys.argv[2], "server.pem"),
            os.path.join(sys.argv[2], "server.key"),
        )
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(Discard(), hostname="sink.test", tls_context=context),
            "127.0.0.1",
            port,
        )
    )
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
