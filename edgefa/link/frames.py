"""Frames: the bytes on the wire, and a decoder that finds them again after garbage.

    magic "\\xefA" | version u8 | kind u8 | flags u8 | seq u32 | length u32 | header CRC32
    | payload (length bytes) | HMAC-SHA256 tag (32 bytes, when flags has AUTH) | CRC32

All integers are big-endian. The header has its own CRC so that a corrupted length is caught at
once: the decoder never waits for a megabyte that was never sent. The trailing CRC covers
everything before it, so a frame whose header survived but whose body did not is reported with
its kind and sequence number, and the receiver can ask for it again (NACK) without waiting.

Pure functions and a pure decoder: bytes in, frames and corruption reports out, no I/O.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"\xefA"
VERSION = 1
HEADER = struct.Struct(">2sBBBII")      # magic, version, kind, flags, seq, payload length
CRC = struct.Struct(">I")
HEADER_BYTES = HEADER.size + CRC.size   # 17
TAG_BYTES = 32                          # HMAC-SHA256
MAX_PAYLOAD = 1 << 20                   # 1 MiB: a bound on what one frame may make us buffer

FLAG_AUTH = 0x01


class Kind(IntEnum):
    HELLO = 1      # client -> server: start a session (nonce, versions)
    WELCOME = 2    # server -> client: session accepted (both nonces, versions)
    REFUSE = 3     # server -> client: session refused (reason); never authenticated. seq: 0, or
                   # the hello_id of the HELLO it answers (a line two hosts share: only that one reads it)
    DATA = 4       # a fragment of a message, delivered reliably and in order
    ACK = 5        # seq = the DATA frame received
    NACK = 6       # seq = the DATA frame the receiver expects: send it again now
    BYE = 7        # client -> server: this host is done; the session ends (authenticated like DATA)


@dataclass(frozen=True)
class Frame:
    kind: int
    seq: int
    payload: bytes
    flags: int = 0
    tag: bytes = b""

    def signed_bytes(self) -> bytes:
        """What the HMAC tag covers: the header fields and the payload."""
        return HEADER.pack(MAGIC, VERSION, self.kind, self.flags, self.seq, len(self.payload)) + self.payload


@dataclass(frozen=True)
class Corrupt:
    """Bytes that did not make a frame. `kind` and `seq` are set when the header was intact, and
    `version` when that intact header was of another protocol version (a peer, not line noise)."""
    reason: str
    skipped: int
    kind: int | None = None
    seq: int | None = None
    version: int | None = None


def encode_frame(kind: int, seq: int, payload: bytes = b"", tag: bytes | None = None) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    flags = FLAG_AUTH if tag is not None else 0
    header = HEADER.pack(MAGIC, VERSION, kind, flags, seq, len(payload))
    body = b"".join([header, CRC.pack(zlib.crc32(header)), payload, tag or b""])
    return body + CRC.pack(zlib.crc32(body))


class FrameDecoder:
    """Feed it bytes in any pieces; it returns whole frames and reports what it had to skip.

    On any damage it drops one byte and searches for the next magic, so a frame that starts
    inside a damaged one is still found (resynchronization)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.max_payload = max_payload
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held back: the start of a frame whose end has not arrived (yet)."""
        return len(self._buf)

    def abandon(self) -> list[Frame | Corrupt]:
        """Give up on the frame held back (its end was lost: a cut connection, a dropped byte on a
        line gone quiet) and search the bytes after its first for frames."""
        if not self._buf:
            return []
        del self._buf[:1]
        return [Corrupt("incomplete frame abandoned", 1), *self.feed(b"")]

    def feed(self, data: bytes) -> list[Frame | Corrupt]:
        self._buf += data
        out: list[Frame | Corrupt] = []
        buf, pos = self._buf, 0
        while True:
            start = buf.find(MAGIC, pos)
            if start < 0:
                # keep a trailing first magic byte: it may be the start of the next frame
                keep = 1 if len(buf) > pos and buf[-1] == MAGIC[0] else 0
                if len(buf) - keep > pos:
                    out.append(Corrupt("garbage", len(buf) - keep - pos))
                pos = len(buf) - keep
                break
            if start > pos:
                out.append(Corrupt("garbage", start - pos))
                pos = start
            if len(buf) - pos < HEADER_BYTES:
                break
            _, version, kind, flags, seq, length = HEADER.unpack_from(buf, pos)
            (header_crc,) = CRC.unpack_from(buf, pos + HEADER.size)
            if header_crc != zlib.crc32(buf[pos:pos + HEADER.size]):
                out.append(Corrupt("header CRC mismatch", 1))
                pos += 1
                continue
            if version != VERSION or length > self.max_payload or kind not in Kind._value2member_map_:
                why = (f"protocol version {version} (this side speaks {VERSION})" if version != VERSION
                       else f"payload of {length} bytes exceeds {self.max_payload}" if length > self.max_payload
                       else f"unknown frame kind {kind}")
                out.append(Corrupt(why, 1, kind, seq, version if version != VERSION else None))
                pos += 1
                continue
            tag_len = TAG_BYTES if flags & FLAG_AUTH else 0
            end = pos + HEADER_BYTES + length + tag_len + CRC.size
            if len(buf) < end:
                break
            (crc,) = CRC.unpack_from(buf, end - CRC.size)
            if crc != zlib.crc32(buf[pos:end - CRC.size]):
                out.append(Corrupt("frame CRC mismatch", 1, kind, seq))
                pos += 1
                continue
            body = pos + HEADER_BYTES
            out.append(Frame(kind, seq, bytes(buf[body:body + length]), flags,
                             bytes(buf[body + length:body + length + tag_len])))
            pos = end
        del buf[:pos]
        return out
