"""Non-blocking socket reads and writes that keep the GIL (``_sockio.c``)."""

from typing_extensions import Buffer

RECV_SIZE: int

def recv(fd: int, /) -> bytes | None: ...
def send(fd: int, data: Buffer, /) -> int: ...
