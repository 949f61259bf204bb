"""An aiosmtpd server that prints when it received each message.

For each message it accepts it prints one line to stdout: the time
(``time.time()``) at the end of DATA, and the first recipient.

Usage: python _recording_server.py PORT
"""
import asyncio
import sys
import time

from aiosmtpd.smtp import SMTP


class Record:
    async def handle_DATA(self, server, session, envelope):
        print(f"{time.time():.6f} {envelope.rcpt_tos[0]}", flush=True)
        return "250 OK"


def main() -> None:
    port = int(sys.argv[1])
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(Record(), hostname="recorder.test"), "127.0.0.1", port))
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
