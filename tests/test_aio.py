"""circuits.aio: asyncio streams over circuits, on the default loop and on uvloop."""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
import uvloop

import circuits
from circuits import aio

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, coro):
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 60))
    finally:
        loop.close()


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_streams_echo_with_backpressure_and_eof(operator, loop_name):
    async def main():
        server = await aio.start_server(echo, "10.0.0.2", 5432, control=operator("db"))
        async with server:
            reader, writer = await aio.open_connection("10.0.0.2", 5432, control=operator("web"))
            assert writer.get_extra_info("peername") == ("10.0.0.2", 5432)
            payload = os.urandom(8 << 20)  # far more than the 256 KiB rings hold

            async def send():
                for i in range(0, len(payload), 100_000):
                    writer.write(payload[i:i + 100_000])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            got = await reader.read(-1)  # to end of data
            await sender
            writer.close()
            await writer.wait_closed()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    run(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_many_streams_at_once(operator, loop_name):
    async def main():
        server = await aio.start_server(echo, "10.0.0.2", 7004, control=operator("db"))
        async with server:
            async def one(i):
                reader, writer = await aio.open_connection("10.0.0.2", 7004,
                                                           control=operator("web"))
                line = f"hello {i}\n".encode()
                writer.write(line)
                await writer.drain()
                assert await reader.readline() == line
                writer.close()
                await writer.wait_closed()
            await asyncio.gather(*(one(i) for i in range(30)))
    run(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_refused_connect_raises_in_the_coroutine(operator, loop_name):
    async def main():
        with pytest.raises(PermissionError):
            await aio.open_connection("10.0.0.3", 1, control=operator("web"))
        with pytest.raises(ConnectionRefusedError):
            await aio.open_connection("10.0.0.2", 5432, control=operator("web"))
    run(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_zero_copy_read_view_awaited(operator, loop_name):
    async def main():
        loop = asyncio.get_running_loop()
        lst = circuits.listen(("10.0.0.2", 5432), control=operator("db"))
        accepted = loop.run_in_executor(None, lst.accept)
        conn = await loop.run_in_executor(
            None, lambda: circuits.connect(("10.0.0.2", 5432), control=operator("web")))
        server, _ = await accepted
        server.setblocking(False)
        loop.call_later(0.1, conn.sendall, b"in place")
        view = await aio.read_view(server)
        assert bytes(view) == b"in place"
        server.consume()
        conn.close()
        assert await aio.read_view(server) is None
        lst.close()
    run(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("close", [False, True])
def test_a_partial_write_is_finished_and_close_flushes(loop_name, close):
    """A write far bigger than the ring: the rest goes out without any help,
    and close() sends what is buffered before it closes."""
    async def main():
        loop = asyncio.get_running_loop()
        a, b = circuits.ring.pair("stream", 4096)
        a.__class__ = circuits.Connection
        reader, writer = aio._streams(loop, a)
        await asyncio.sleep(0)
        got = loop.run_in_executor(None, lambda: sum(iter(lambda: len(b.recv(65536)), 0)))
        writer.write(b"x" * 100_000)
        if close:
            writer.close()
            await writer.wait_closed()
        else:
            await writer.drain()
            writer.close()
        assert await asyncio.wait_for(got, 10) == 100_000
    run(loop_name, main())
