"""The floor a policy server's HTTP path is measured against: a bare asyncio responder.

    python bench/http_floor.py --port 5099

Per request it does only what any server must: read the HTTP request (headers,
Content-Length body), parse the JSON, decode the base64 JPEG with Pillow when
there is one, and answer a small JSON on the kept-alive connection. No
framework, no validation, no thread hops, no model. bench_server.py starts it
beside the real server and prints each row's ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys

from PIL import Image

ANSWER = json.dumps({"has_eef_target": False, "confidence": 0.0}).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)


def handle_body(body: bytes) -> None:
    payload = json.loads(body) if body else {}
    image = payload.get("image") if isinstance(payload, dict) else None
    if image:
        Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            handle_body(await reader.readexactly(length) if length else b"")
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main_async(host: str, port: int) -> None:
    server = await asyncio.start_server(serve_connection, host, port)
    print(f"floor listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(main_async(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
