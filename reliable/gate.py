"""The gate: what a node says to addresses it keeps no session for.

Theory of operation. A datagram from an address the node does not know, or
one it cannot accept, must never make the node keep state or send more than
it received: a spoofed source would otherwise turn the node into an
amplifier, or fill its tables. Everything the node sends outside a session
passes here, and obeys three rules:

* **amplification**: a reply to an unvalidated address is never larger than
  ``AMPLIFICATION`` times the datagram it answers (``amplification_limited``);
* **rate**: a RESET or AUTH_FAILED goes to one address at most once per
  ``RESET_INTERVAL`` seconds (the last ``RESET_MEMORY`` addresses are
  remembered), and CHALLENGEs at most ``Config.max_challenges_per_second``
  in all (a token bucket; ``challenge_limited``);
* **statelessness**: a CHALLENGE's cookie is a keyed MAC of the address and
  incarnation it vouches for and of the time bucket it was issued in
  (``COOKIE_LIFETIME`` seconds), so checking it needs no memory of having
  issued it; a cookie is good in its own bucket and the one after.

What it sends: a RESET to a peer that addressed an incarnation of ours that
is over (so it learns of our restart at once); an unsealed AUTH_FAILED,
echoing the incarnation the sender claimed, to a datagram that failed our
security check (so a peer with the wrong key fails fast); a CHALLENGE
carrying a cookie to a new address when ``Config.validate_addresses`` is
on. The endpoint decides *when* (its admission pipeline); the gate decides
whether it may and builds the reply. It is handed the node's incarnation,
its sealing function, the queue for loose datagrams and the drop counter:
nothing else of the endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import errors
from .security import BAD_TAG, UNSEALED, WRONG_MODE
from .wire import Kind, Packet, encode, encode_body

__all__ = ["AMPLIFICATION", "COOKIE_LIFETIME", "RESET_INTERVAL", "RESET_MEMORY", "Gate"]

# The node's operator log is one logger, whichever module of the core speaks (see endpoint.py).
_log = logging.getLogger("reliable.endpoint")

RESET_INTERVAL = 0.1  #: at most one RESET or AUTH_FAILED per address per this many seconds
RESET_MEMORY = 256  #: addresses remembered for that rate limit
COOKIE_LIFETIME = 30.0  #: seconds a CHALLENGE's cookie stays valid (two buckets)
AMPLIFICATION = 3  #: an unvalidated address never gets a reply over 3x its datagram

_REFUSAL_REASON = {
    BAD_TAG: "its tag does not verify: our keys differ",
    UNSEALED: "it is unsealed and this node requires security",
    WRONG_MODE: "it uses a different security mode",
}


class Gate:
    """Address validation (cookies, challenges) and the node's unsolicited replies.

    ``seal`` turns a packet body into a datagram as the node's security mode
    wants it; ``queue`` sends a datagram outside any session; ``drop``
    counts a refusal by its reason.
    """

    def __init__(
        self,
        incarnation: int,
        cookie_key: bytes,
        challenges_per_second: int,
        *,
        seal: Callable[[bytes], bytes],
        queue: Callable[[bytes, Any], None],
        drop: Callable[[str], None],
    ) -> None:
        self.incarnation = incarnation
        self._cookie_key = cookie_key
        self._rate = challenges_per_second
        self._challenge_budget = float(challenges_per_second)
        self._challenge_clock = 0.0
        self.challenges_sent = 0
        self._replied: OrderedDict[Any, float] = OrderedDict()  # address -> last RESET/AUTH_FAILED
        self._seal = seal
        self._queue = queue
        self._drop = drop

    # ------------------------------------------------------ address validation

    def _cookie(self, addr: Any, incarnation: int, bucket: int) -> bytes:
        material = repr(addr).encode() + incarnation.to_bytes(8, "big")
        material += bucket.to_bytes(8, "big", signed=True)
        return hashlib.blake2b(material, key=self._cookie_key, digest_size=16).digest()

    def issue_cookie(self, addr: Any, incarnation: int, now: float) -> bytes:
        """The cookie that proves ``addr`` (at ``incarnation``) receives what we send it."""
        return self._cookie(addr, incarnation, math.floor(now / COOKIE_LIFETIME))

    def cookie_valid(self, pkt: Packet, addr: Any, now: float) -> bool:
        """A cookie we issued to this address and incarnation within the last lifetime or two.

        Stateless: the cookie is a MAC of what it vouches for, so a flood of
        spoofed sources costs no memory.
        """
        if pkt.cookie is None:
            return False
        bucket = math.floor(now / COOKIE_LIFETIME)
        return any(
            hmac.compare_digest(pkt.cookie, self._cookie(addr, pkt.src_incarnation, b))
            for b in (bucket, bucket - 1)
        )

    def challenge(self, pkt: Packet, addr: Any, received: int, now: float) -> None:
        """Ask a new address to prove itself: a CHALLENGE carrying its cookie, if the
        node's challenge rate allows one now."""
        rate = self._rate
        elapsed = max(0.0, now - self._challenge_clock)
        self._challenge_budget = min(float(rate), self._challenge_budget + elapsed * rate)
        self._challenge_clock = now
        if self._challenge_budget < 1:
            self._drop("challenge_limited")
            return
        self._challenge_budget -= 1
        challenge = Packet(
            kind=Kind.CHALLENGE,
            src_incarnation=self.incarnation,
            dst_incarnation=pkt.src_incarnation,
            cookie=self.issue_cookie(addr, pkt.src_incarnation, now),
        )
        if self.answer(self._seal(encode_body(challenge)), addr, received):
            self.challenges_sent += 1
            _log.debug("challenged %s to prove its address", errors.format_address(addr))

    # ------------------------------------------------------ unsolicited replies

    def may_answer(self, addr: Any, now: float) -> bool:
        """Rate limit for unsolicited replies (RESET, AUTH_FAILED): one per interval per address."""
        last = self._replied.get(addr)
        if last is not None and now - last < RESET_INTERVAL:
            return False
        self._replied[addr] = now
        self._replied.move_to_end(addr)
        while len(self._replied) > RESET_MEMORY:
            self._replied.popitem(last=False)
        return True

    def answer(self, reply: bytes, addr: Any, received: int) -> bool:
        """Queue a reply to an address we have not validated, within the amplification bound."""
        if len(reply) > AMPLIFICATION * received:
            self._drop("amplification_limited")
            return False
        self._queue(reply, addr)
        return True

    def reset(self, addr: Any, their_incarnation: int, now: float, received: int) -> None:
        """Tell a peer that addressed an incarnation of ours that is over: RESET."""
        if not self.may_answer(addr, now):
            return
        pkt = Packet(
            kind=Kind.RESET, src_incarnation=self.incarnation, dst_incarnation=their_incarnation
        )
        self.answer(self._seal(encode_body(pkt)), addr, received)

    def refuse(self, data: bytes, addr: Any, refusal: int, now: float) -> None:
        """Tell the sender its datagram failed our security check, so it fails fast.

        Unsealed (it may not share our key), echoing the incarnation it
        claimed so that an off-path attacker cannot forge one, rate-limited
        and never larger than a small multiple of what it answers.
        """
        if len(data) < 16 or data[3] == Kind.AUTH_FAILED:
            return
        their = int.from_bytes(data[8:16], "big")
        if their == 0 or not self.may_answer(addr, now):
            return
        reply = Packet(
            kind=Kind.AUTH_FAILED,
            src_incarnation=self.incarnation,
            dst_incarnation=their,
            refusal=refusal,
        )
        if self.answer(encode(reply), addr, len(data)):
            _log.info(
                "refused a datagram from %s (%s); told it with AUTH_FAILED",
                errors.format_address(addr),
                _REFUSAL_REASON.get(refusal, "failed the security check"),
            )
