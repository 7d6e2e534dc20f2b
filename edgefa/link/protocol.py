"""The link protocol as a state machine: bytes and clock readings in, events and bytes out.

No sockets, no serial ports, no clock of its own (the caller passes `now`), the way h11 does HTTP.
That is what lets the tests drive two ends through a lossy in-memory wire, and fuzz it.

Session. The client sends HELLO with a fresh 16-byte nonce; the server answers WELCOME with its
own nonce. With a shared key, HELLO and WELCOME are tagged with the key and every later frame
with a session key derived from both nonces, so a frame recorded in one session is worthless in
another, and sequence numbers stop replays inside a session.

Reliable messages. A message is cut into DATA fragments (message id, total size, offset, bytes).
One fragment is in flight at a time (stop-and-wait: the request/response traffic of a device
link gains nothing from a window, and the receiver stays trivial). The receiver ACKs each
fragment, ACKs a repeated one again without delivering it twice, and NACKs when it sees damage
so the sender repeats at once instead of after a timeout. On a noisy line the sender halves the
fragment size at each repeat and doubles it again after a run of clean ACKs; fragments carry their
offset, so a repeat may be shorter than the original and the receiver still reassembles exactly.

A line two hosts share (a serial port or pseudo-terminal opened twice). Every host reads what the
device writes, and each byte goes to whichever reads first. So the server refuses a second host's
HELLO while a session is live (`session_hold`) with a REFUSE addressed to that HELLO (its seq is
the HELLO's hello_id: the host in session ignores it), a host ends its session with BYE so the next
one need not wait, and a host connecting for the first time that reads another session's frames
stops at once (LineBusy): each frame it reads is one the host in session loses.

Not an edgefa device. A first contact whose answer is text (an SSH banner, an HTTP reply), or our
own HELLO echoed back (loop://), is reported at once (NotAnEdgefaDevice): no retry can fix it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections import deque
from dataclasses import asdict, dataclass, field

from ..errors import EdgefaError
from .frames import FLAG_AUTH, MAGIC, MAX_PAYLOAD, VERSION, Corrupt, Frame, FrameDecoder, Kind, encode_frame

NONCE_BYTES = 16
FRAGMENT = struct.Struct(">III")        # message id, message size, offset of this fragment
MAX_MESSAGE = 16 << 20                  # bound on a reassembled message (bundles travel in chunks)
ANSWER_HEAD = 64                        # client: the first bytes of an answer to HELLO kept, to name them
TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}   # printable ASCII, tab, CR, LF
OVERHEARD_HELLO_GAP = 0.25              # client: HELLO again at most this often while overhearing another session


class LinkError(EdgefaError):
    """The link failed: the peer stopped answering, refused us, or broke the protocol."""


# --- events --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionStarted:
    peer: dict                  # the peer's hello: versions and whatever else it chose to say


@dataclass(frozen=True)
class MessageReceived:
    data: bytes


@dataclass(frozen=True)
class SessionRefused:
    reason: str


@dataclass(frozen=True)
class LinkLost:
    reason: str


@dataclass(frozen=True)
class NotAnEdgefaDevice:
    """Client: what answered our HELLO is not an edgefa device (`what` it did); no retry helps."""
    what: str


@dataclass(frozen=True)
class LineBusy:
    """Client, first contact: another host's session is running on this line (`what` showed it)."""
    what: str


@dataclass(frozen=True)
class SessionEnded:
    """Server: the host ended its session (BYE)."""
    reason: str


@dataclass
class LinkStats:
    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    payload_bytes_sent: int = 0          # message bytes, counted once each (goodput)
    retransmits: int = 0
    duplicates: int = 0                  # repeated fragments, re-ACKed and not delivered again
    corrupt: int = 0                     # damage the decoder reported
    nacks_sent: int = 0
    forged: int = 0                      # bad or missing HMAC tags
    replayed: int = 0                    # authentic frames with an old sequence number
    sessions: int = 0
    dropped_idle: int = 0                # TCP peers dropped for silence (server.PeerTimeouts)
    refused_busy: int = 0                # TCP peers told "device busy" (written by the server's
                                         # accepting thread only: one writer, no lost counts)
    busy_hellos: int = 0                 # HELLOs of a second host on a shared line, refused "busy"
    sessions_ended: int = 0              # sessions the host ended with BYE

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _InFlight:
    seq: int
    msg_id: int
    offset: int
    length: int
    sent_at: float
    repeats: int = 0


@dataclass
class Timing:
    """Retransmission timing (RFC 6298 style), and how long without progress means the link is gone."""
    initial_rto: float = 1.0
    min_rto: float = 0.05
    max_rto: float = 5.0
    give_up_after: float = 30.0
    stall: float = 1.0              # a partial frame with no new byte for this long is abandoned


@dataclass
class Connection:
    role: str                                   # "client" or "server"
    key: bytes | None = None                    # shared key: every frame authenticated
    hello: dict = field(default_factory=dict)   # what we tell the peer about ourselves
    max_fragment: int = 64 * 1024
    min_fragment: int = 64
    timing: Timing = field(default_factory=Timing)
    # server: a HELLO from another host (another hello "client" token) does not take over an open
    # session active within this many seconds, but gets a "device busy" REFUSE. None: it always does.
    session_hold: float | None = None

    def __post_init__(self):
        if self.role not in ("client", "server"):
            raise ValueError(f"role must be client or server, not {self.role!r}")
        if not (0 < self.min_fragment <= self.max_fragment <= MAX_PAYLOAD - 2 * FRAGMENT.size):
            raise ValueError("need 0 < min_fragment <= max_fragment <= the frame payload limit")
        self.stats = LinkStats()
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._events: deque = deque()
        self._reset_session()
        self._hello_nonce = b""          # client: the nonce of the HELLO we are waiting on
        self._hello_sent_at = 0.0
        self._last_rx = 0.0
        self._start_answer()

    # --- the caller's side ------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    @property
    def buffered(self) -> int:
        """Bytes of a frame whose end has not arrived (yet)."""
        return self._decoder.buffered

    def connect(self, now: float) -> None:
        """Client: start (or restart) a session. Queued messages wait for the WELCOME."""
        assert self.role == "client"
        self._reset_session()
        self._state = "connecting"
        self._hello_nonce = os.urandom(NONCE_BYTES)
        self._last_progress = now
        self._start_answer()
        self._send_hello(now)

    def close_session(self) -> None:
        """Client: end the session with BYE (queued; send it before closing the transport), so the
        device need not wait out its idle time before it serves another host."""
        if self.role == "client" and self._state == "open":
            self._emit(Kind.BYE, 0)
            self._reset_session()

    @property
    def silent(self) -> bool:
        """Client, connecting: not one byte has come since our HELLO."""
        return self._answer_bytes == 0

    @property
    def unframed_answer(self) -> bytes | None:
        """Client, first contact: the first bytes of an answer to HELLO in which no frame could
        start (no magic anywhere), or None. A damaged WELCOME still holds its magic; this is another
        program, or a serial line at the wrong baud rate."""
        if self.stats.sessions or not self._answer_bytes or self._answer_magic or self._answer_frames:
            return None
        return bytes(self._answer_head)

    @property
    def overheard(self) -> str | None:
        """Client, first contact: what of another host's session we saw while connecting, or None."""
        return self._overheard

    def _start_answer(self) -> None:
        """Client: forget what answered the last HELLO."""
        self._answer_head = bytearray()     # its first ANSWER_HEAD bytes
        self._answer_bytes = 0
        self._answer_text = True            # every byte so far printable text
        self._answer_magic = False          # the frame magic seen (a frame, or a damaged one)
        self._answer_frames = 0             # intact frames of this protocol version
        self._answer_last = b""             # the last byte: a magic may straddle two reads
        self._overheard: str | None = None

    def send(self, message: bytes, now: float) -> None:
        """Queue one message for reliable, in-order, exactly-once delivery in this session."""
        if len(message) > MAX_MESSAGE:
            raise ValueError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE}")
        self._next_msg_id += 1
        self._queue.append((self._next_msg_id, bytes(message)))
        self._active_at = now       # a reply after a long request: the host is still in session
        self._pump(now)

    def receive_data(self, data: bytes, now: float) -> None:
        self.stats.bytes_received += len(data)
        self._last_rx = now
        if self.role == "client" and self._state == "connecting" and data:
            self._answer_head += data[:ANSWER_HEAD - len(self._answer_head)]
            self._answer_bytes += len(data)
            self._answer_text = self._answer_text and TEXT_BYTES.issuperset(data)
            self._answer_magic = self._answer_magic or MAGIC in self._answer_last + data
            self._answer_last = data[-1:]
        self._consume(self._decoder.feed(data), now)

    def reset_input(self) -> None:
        """Forget bytes held back from a transport that has gone (a new TCP connection starts clean)."""
        self._decoder = FrameDecoder()

    def end_session(self) -> None:
        """Server: forget the session and the bytes held back (its TCP connection was closed), so
        that nothing of it carries over to the next connection."""
        self._reset_session()
        self.reset_input()

    def refuse(self, reason: str) -> None:
        """Queue a REFUSE with `reason`: what a peer about to be disconnected is told, in one line."""
        self._emit(Kind.REFUSE, 0, reason.encode()[:200])

    def _consume(self, items: list, now: float) -> None:
        damaged = False
        for item in items:
            if isinstance(item, Corrupt):
                self.stats.corrupt += 1
                damaged = True
                if item.version is not None:
                    self._other_version(item.version)
            else:
                self.stats.frames_received += 1
                if self._state == "connecting":
                    self._answer_frames += 1
                self._on_frame(item, now)
        if self._state == "connecting" and self._answers_in_text():
            text = " ".join(self._answer_head.decode("ascii").split())
            self._not_edgefa(f"it answered in text: {text[:60]!r}")
            return
        if damaged and self._state == "connecting":
            self._send_hello(now)             # the WELCOME may have been the damage: ask again now
        if damaged and self._state == "open":
            # Something of ours or the peer's was lost: ask for the expected fragment, and repeat
            # ours if one is waiting (its ACK may have been the damage). Both are harmless if not.
            self._emit(Kind.NACK, self._recv_expected)
            self.stats.nacks_sent += 1
            if self._inflight:
                self._retransmit(now)
        self._pump(now)

    def poll(self, now: float) -> None:
        """Run the timers: repeat what was not acknowledged, and give up after a long silence."""
        while self._decoder.buffered and now - self._last_rx > self.timing.stall:
            self._consume(self._decoder.abandon(), now)      # its end will never come
        if self._state == "connecting" and now - self._hello_sent_at >= self._rto:
            self._rto = min(2 * self._rto, self.timing.max_rto)
            self._send_hello(now)
        elif self._inflight and now - self._inflight.sent_at >= self._rto:
            self._rto = min(2 * self._rto, self.timing.max_rto)
            self._retransmit(now)
        waiting = self._state == "connecting" or self._inflight is not None
        if waiting and now - self._last_progress > self.timing.give_up_after:
            self._lose(f"no answer from the peer for {self.timing.give_up_after:.0f} s")
        self._pump(now)

    def next_deadline(self) -> float | None:
        """When `poll` next has work to do (None: nothing is waiting for an answer)."""
        deadlines = [self._hello_sent_at + self._rto if self._state == "connecting" else None,
                     self._inflight.sent_at + self._rto if self._inflight else None,
                     self._last_rx + self.timing.stall if self._decoder.buffered else None]
        return min((d for d in deadlines if d is not None), default=None)

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def events(self) -> list:
        out = list(self._events)
        self._events.clear()
        return out

    # --- session ----------------------------------------------------------------------------

    def _reset_session(self) -> None:
        self._state = "idle" if self.role == "client" else "listening"
        self._send_key: bytes | None = None     # one key per direction: a frame reflected back
        self._recv_key: bytes | None = None     # to its sender fails authentication
        self._peer_nonce = b""
        self._welcome = b""                  # server: the WELCOME payload, repeated for a repeated HELLO
        self._send_seq = 0
        self._recv_expected = 1
        self._inflight: _InFlight | None = None
        self._queue: deque[tuple[int, bytes]] = deque()
        self._send_offset = 0
        self._next_msg_id = 0
        self._partial: tuple[int, int, bytearray] | None = None   # (msg id, size, bytes so far)
        self._delivered_msg_id = 0
        self._fragment = self.max_fragment
        self._clean_acks = 0
        self._rto = self.timing.initial_rto
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._last_progress = 0.0
        self._peer_hello: dict = {}          # server: the HELLO of the host in session
        self._opened_at = 0.0
        self._active_at = 0.0                # server: the session's last frame in, or message out

    def _other_version(self, version: int) -> None:
        """An intact frame of another protocol version: a peer running another edgefa, which no
        retry will fix. A connecting client gives up at once; a server says what it speaks."""
        if self.role == "client" and self._state == "connecting":
            self._refused(f"the device speaks link protocol v{version}, this host v{VERSION} "
                          "(install the same edgefa on both)")
        elif self.role == "server" and self._state != "open":
            self._emit(Kind.REFUSE, 0, f"this device speaks link protocol v{VERSION}, not v{version}".encode())

    def _refused(self, reason: str) -> None:
        self._state = "refused"
        self._events.append(SessionRefused(reason[:200]))

    def _not_edgefa(self, what: str) -> None:
        self._state = "refused"
        self._events.append(NotAnEdgefaDevice(what))

    def _answers_in_text(self) -> bool:
        """First contact: the answer so far is text, and no frame (a server's banner or error page)."""
        return (not self.stats.sessions and self._answer_text and self._answer_bytes >= 4
                and not self._answer_frames)

    def _overhear(self, what: str, now: float) -> None:
        """Client, connecting on first contact: a frame of another host's session. The device's
        answer to our HELLO may go to that host instead of us (both read the line): ask again soon."""
        if self.stats.sessions:
            return                        # a reconnecting host's old session may still send frames
        self._overheard = what
        if now - self._hello_sent_at >= OVERHEARD_HELLO_GAP:
            self._send_hello(now)

    def _refuse_hello(self, nonce: bytes, why: str) -> None:
        """Server: a REFUSE addressed to the HELLO with this nonce."""
        self._emit(Kind.REFUSE, hello_id(nonce), why.encode()[:200])

    def _holds_session(self, peer: dict, now: float) -> bool:
        """Server: does the open session keep this HELLO's host out? Not when it is the same host
        coming back (its token), nor once the session has been idle for `session_hold`."""
        if self.session_hold is None or self._state != "open":
            return False
        token = peer.get("client")
        if token is not None and token == self._peer_hello.get("client"):
            return False
        return now - self._active_at < self.session_hold

    def _busy_reason(self, now: float) -> str:
        p = self._peer_hello
        who = f"host {str(p.get('host'))[:40]!r} (pid {str(p.get('pid'))[:10]})" if "host" in p else "another host"
        return (f"device busy: in a session with {who} for {now - self._opened_at:.0f} s, active "
                f"{now - self._active_at:.1f} s ago (a session idle {self.session_hold:g} s is released)")

    def _send_hello(self, now: float) -> None:
        self._hello_sent_at = now
        self._emit(Kind.HELLO, 0, self._hello_nonce + json.dumps(self.hello, separators=(",", ":")).encode(),
                   key=self.key)

    def _on_hello(self, frame: Frame, now: float) -> None:
        if self.role != "server" or len(frame.payload) < NONCE_BYTES:
            return
        nonce = frame.payload[:NONCE_BYTES]
        if (self.key is not None) != bool(frame.flags & FLAG_AUTH):
            why = ("this device requires a shared key" if self.key is not None
                   else "this device has no shared key; connect without one")
            if self.key is not None:
                self.stats.forged += 1
            self._refuse_hello(nonce, why)
            return
        if not self._authentic(frame, self.key):
            # Say so, rather than leave an honest host with the wrong key waiting: a forger learns
            # nothing from it that the silence would not tell.
            self._refuse_hello(nonce, "frame authentication failed (wrong shared key?)")
            return
        if self._state == "open" and nonce == self._peer_nonce:
            self._emit(Kind.WELCOME, 0, self._welcome, key=self.key)    # our WELCOME was lost
            return
        peer = _parse_hello(frame.payload[NONCE_BYTES:])
        if peer is None:
            self._refuse_hello(nonce, "malformed HELLO")
            return
        if self._holds_session(peer, now):
            # A second host on a shared line. Taking the session over would leave the first host's
            # frames landing in the second's session (replies crossed, both stalled); it gets its
            # turn when this host says BYE, closes a pty, or stays idle for session_hold.
            self.stats.busy_hellos += 1
            self._refuse_hello(nonce, self._busy_reason(now))
            return
        self._reset_session()
        own_nonce = os.urandom(NONCE_BYTES)
        self._peer_nonce, self._state = nonce, "open"
        self._recv_key, self._send_key = _session_keys(self.key, nonce, own_nonce)
        self._welcome = nonce + own_nonce + json.dumps(self.hello).encode()
        self._last_progress = self._opened_at = self._active_at = now
        self._peer_hello = peer
        self.stats.sessions += 1
        self._emit(Kind.WELCOME, 0, self._welcome, key=self.key)
        self._events.append(SessionStarted(peer))

    def _on_welcome(self, frame: Frame, now: float) -> None:
        if self.role != "client" or self._state != "connecting":
            return
        if (self.key is not None) != bool(frame.flags & FLAG_AUTH):
            if self.key is not None:
                self.stats.forged += 1
                return
            self._refused("the device authenticates its frames; give the shared key")   # no retry helps
            return
        if not self._authentic(frame, self.key):
            return
        p = frame.payload
        if len(p) < 2 * NONCE_BYTES or p[:NONCE_BYTES] != self._hello_nonce:
            return                                                # a WELCOME for another HELLO
        peer = _parse_hello(p[2 * NONCE_BYTES:])
        if peer is None:
            self._refused("malformed WELCOME")
            return
        self._send_key, self._recv_key = _session_keys(self.key, self._hello_nonce, p[NONCE_BYTES:2 * NONCE_BYTES])
        self._state, self._last_progress = "open", now
        self._rto = self.timing.initial_rto
        self.stats.sessions += 1
        self._events.append(SessionStarted(peer))

    # --- frames -----------------------------------------------------------------------------

    def _on_frame(self, frame: Frame, now: float) -> None:
        if frame.kind == Kind.HELLO:
            if self.role == "server":
                self._on_hello(frame, now)
            elif self._state == "connecting" and frame.payload[:NONCE_BYTES] == self._hello_nonce:
                self._not_edgefa("it sends back what this host sends (an echo: loop://, or a line looped back)")
        elif frame.kind == Kind.WELCOME:
            self._on_welcome(frame, now)
        elif frame.kind == Kind.REFUSE:
            addressed = frame.seq != 0            # the answer to one HELLO, maybe another host's
            if self.role == "client" and self._state == "connecting":
                if not addressed or frame.seq == hello_id(self._hello_nonce):
                    self._refused(frame.payload.decode("utf-8", "replace"))
                else:
                    self._overhear("the device's answer to another host's HELLO", now)
            elif self.role == "client" and self._state == "open" and self.key is None and not addressed:
                # Reconnect at once. Not on a keyed link: REFUSE carries no tag, and 21 forged bytes
                # must not end an authenticated session (there, the give-up timer notices instead).
                self._lose("the device has no session for us (it restarted?)")
        elif self._state != "open":
            if self.role == "server" and frame.kind == Kind.DATA:
                self._emit(Kind.REFUSE, 0, b"no session: send HELLO")  # rather than 30 s of silence
            elif (self.role == "client" and self._state == "connecting" and not self.stats.sessions
                  and frame.kind in (Kind.DATA, Kind.ACK)):
                # Never ours before our first session (and bytes from before we opened the line were
                # flushed): a session of another host is live. Stop reading at once, since every
                # frame we read is one that host loses. (Not NACK: a server whose WELCOME we missed
                # NACKs our damaged repeat of HELLO.)
                self._state = "refused"
                self._events.append(LineBusy(f"another host is in a session on this line "
                                             f"({Kind(frame.kind).name} frames of its session seen)"))
            return
        elif (self._recv_key is not None) != bool(frame.flags & FLAG_AUTH):
            self.stats.forged += 1
        elif not self._authentic(frame, self._recv_key):
            return
        elif frame.kind == Kind.BYE:
            if self.role == "server":
                self._reset_session()
                self.stats.sessions_ended += 1
                self._events.append(SessionEnded("the host ended its session"))
        else:
            self._active_at = now
            if frame.kind == Kind.DATA:
                self._on_data(frame, now)
            elif frame.kind == Kind.ACK:
                self._on_ack(frame.seq, now)
            elif frame.kind == Kind.NACK and self._inflight:
                if frame.seq == self._inflight.seq:
                    self._retransmit(now)
                elif frame.seq == self._inflight.seq + 1:    # it expects the next one: ours arrived
                    self._on_ack(self._inflight.seq, now)

    def _authentic(self, frame: Frame, key: bytes | None) -> bool:
        if key is None:
            return True
        if hmac.compare_digest(hmac.new(key, frame.signed_bytes(), hashlib.sha256).digest(), frame.tag):
            return True
        self.stats.forged += 1
        return False

    def _on_data(self, frame: Frame, now: float) -> None:
        if frame.seq == self._recv_expected - 1:
            self.stats.duplicates += 1                            # our ACK was lost: say it again
            self._emit(Kind.ACK, frame.seq)
            return
        if frame.seq < self._recv_expected - 1:
            self.stats.replayed += 1
            return
        if frame.seq > self._recv_expected or len(frame.payload) < FRAGMENT.size:
            return                                                # not what a correct peer sends
        msg_id, size, offset = FRAGMENT.unpack_from(frame.payload)
        chunk = frame.payload[FRAGMENT.size:]
        if msg_id > self._delivered_msg_id:
            if self._partial is None or self._partial[0] != msg_id:
                if offset != 0 or msg_id != self._delivered_msg_id + 1 or size > MAX_MESSAGE:
                    self._lose("protocol error: a message fragment out of order")
                    return
                self._partial = (msg_id, size, bytearray())
            _, size, got = self._partial
            if offset > len(got) or offset + len(chunk) > size:
                self._lose("protocol error: a fragment past the end of its message")
                return
            got += chunk[len(got) - offset:]
            if len(got) == size:
                self._partial, self._delivered_msg_id = None, msg_id
                self._events.append(MessageReceived(bytes(got)))
        self._recv_expected += 1
        self._last_progress = now
        self._emit(Kind.ACK, frame.seq)

    def _on_ack(self, seq: int, now: float) -> None:
        f = self._inflight
        if f is None or seq != f.seq:
            return
        if f.repeats == 0:                                        # Karn: time only clean sends
            self._sample_rtt(now - f.sent_at)
        self._clean_acks = self._clean_acks + 1 if f.repeats == 0 else 0
        if self._clean_acks >= 8 and self._fragment < self.max_fragment:
            self._fragment, self._clean_acks = min(2 * self._fragment, self.max_fragment), 0
        msg_id, message = self._queue[0]
        self._send_offset = f.offset + f.length
        self.stats.payload_bytes_sent += f.length
        if self._send_offset >= len(message):
            self._queue.popleft()
            self._send_offset = 0
        self._inflight, self._last_progress = None, now

    def _sample_rtt(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._rto = min(max(self._srtt + 4 * self._rttvar, self.timing.min_rto), self.timing.max_rto)

    # --- sending ----------------------------------------------------------------------------

    def _pump(self, now: float) -> None:
        if self._state != "open" or self._inflight or not self._queue:
            return
        msg_id, message = self._queue[0]
        length = min(self._fragment, len(message) - self._send_offset)
        self._send_seq += 1
        self._inflight = _InFlight(self._send_seq, msg_id, self._send_offset, length, now)
        self._last_progress = now        # waiting starts now, however long we were idle
        self._send_fragment()

    def _retransmit(self, now: float) -> None:
        f = self._inflight
        self.stats.retransmits += 1
        f.repeats += 1
        self._clean_acks = 0
        self._fragment = max(self._fragment // 2, self.min_fragment)
        f.length = min(f.length, self._fragment)   # a shorter repeat is fine: fragments carry offsets
        f.sent_at = now
        self._send_fragment()

    def _send_fragment(self) -> None:
        f = self._inflight
        message = self._queue[0][1]
        payload = FRAGMENT.pack(f.msg_id, len(message), f.offset) + message[f.offset:f.offset + f.length]
        self._emit(Kind.DATA, f.seq, payload)

    def _emit(self, kind: int, seq: int, payload: bytes = b"", key: bytes | None = None) -> None:
        if kind in (Kind.DATA, Kind.ACK, Kind.NACK, Kind.BYE):
            key = self._send_key
        tag = None
        if key is not None:
            tag = hmac.new(key, Frame(kind, seq, payload, FLAG_AUTH).signed_bytes(), hashlib.sha256).digest()
        data = encode_frame(kind, seq, payload, tag)
        self._out += data
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(data)

    def _lose(self, reason: str) -> None:
        self._reset_session()
        self._state = "lost"
        self._events.append(LinkLost(reason))


def hello_id(nonce: bytes) -> int:
    """The nonzero 32-bit id of a HELLO (from its nonce) that a REFUSE answering it carries as seq."""
    return int.from_bytes(nonce[:4], "big") | 1


def _session_keys(key: bytes | None, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes | None, bytes | None]:
    """(client -> server key, server -> client key) for this session, bound to both nonces."""
    if key is None:
        return None, None
    salt = b"edgefa-link-v1" + client_nonce + server_nonce
    return (hmac.new(key, salt + b"client->server", hashlib.sha256).digest(),
            hmac.new(key, salt + b"server->client", hashlib.sha256).digest())


def _parse_hello(data: bytes) -> dict | None:
    try:
        hello = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return hello if isinstance(hello, dict) else None
