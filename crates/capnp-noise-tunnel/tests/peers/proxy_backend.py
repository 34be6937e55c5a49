"""A TCP backend that reads a PROXY protocol header (version 1 or 2) with
PyPI's proxy-protocol package (an independent parser), then echoes what
follows until the client's end of stream.

    proxy_backend.py --check   prints VERSIONS proxy-protocol=X and exits
    proxy_backend.py           listens on 127.0.0.1, prints LISTENING PORT,
                               and for each connection one line:
                               CONN source=IP:PORT dest=IP:PORT vat=VATID|- len=N
"""

import asyncio
import sys

from proxyprotocol.__about__ import __version__
from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.reader import ProxyProtocolReader

VAT_ID_TLV = 0xE0


def addr(a):
    ip, port = a
    return f"{ip}:{port}"


async def handle(reader, writer):
    try:
        result = await ProxyProtocolReader(ProxyProtocolDetect()).read(reader)
        data = await reader.read()
        writer.write(data)
        await writer.drain()
        vat = result.tlv.get(VAT_ID_TLV)
        print(
            f"CONN source={addr(result.source)} dest={addr(result.dest)} "
            f"vat={vat.decode('ascii') if vat else '-'} len={len(data)}",
            flush=True,
        )
    except Exception as e:  # reported to the test, which fails on it
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        print(f"VERSIONS proxy-protocol={__version__}")
    else:
        asyncio.run(main())
