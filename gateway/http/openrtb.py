"""OpenRTB mode: the device addresses of a bid request, read the way a strict bidder would.

Fail closed: when the body cannot be read unambiguously, the caller answers as blocked
rather than forward something it could not check. Bidders disagree on the corners of
JSON (Go's encoding/json matches keys case-insensitively and keeps the last duplicate;
others keep the first; some reject invalid UTF-8, others replace it), so every corner
where two readers could see different addresses is refused: invalid UTF-8, duplicate or
case-variant keys, trailing data, NaN/Infinity, integers wider than 64 bits, nesting
deeper than MAX_DEPTH, and a Content-Encoding other than identity, gzip or deflate.
"""

from __future__ import annotations

import json
import zlib

from .clientip import canonical

MAX_DEPTH = 32
_MAX_INT_DIGITS = 20  # int64/uint64 fit in 20 digits (sign included)


class Unreadable(ValueError):
    """The body cannot be read unambiguously: answer as blocked."""


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs) or len({key.lower() for key in result}) != len(result):
        raise Unreadable("duplicate or case-variant key")
    return result


def _int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise Unreadable("integer wider than 64 bits")
    return int(text)


def _constant(text: str) -> None:
    raise Unreadable(f"{text} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_int, parse_constant=_constant)


def decode_body(body: bytes, content_encoding: bytes | None, max_bytes: int) -> bytes:
    """The body as the bidder reads it, decompressed (bounded by `max_bytes`)."""
    if content_encoding is None:
        return body
    coding = content_encoding.strip().lower()
    if coding in (b"", b"identity"):
        return body
    if coding in (b"gzip", b"x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == b"deflate":
        inflater = zlib.decompressobj()
    else:
        raise Unreadable(f"unknown Content-Encoding {coding!r}")
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise Unreadable(f"bad {coding.decode()} data") from exc
    if len(data) > max_bytes or not inflater.eof or inflater.unused_data:
        raise Unreadable("compressed body too large, truncated or followed by data")
    return data


def _depth_ok(value: object) -> bool:
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return True


def _get(obj: dict, key: str) -> object:
    """obj[key] matched case-insensitively (keys are unique up to case here)."""
    if key in obj:
        return obj[key]
    for name, value in obj.items():
        if name.lower() == key:
            return value
    return None


def device_addresses(body: bytes, content_encoding: bytes | None = None, max_bytes: int = 1 << 20) -> list[str]:
    """The canonical addresses in `device.ip` / `device.ipv6`; raises Unreadable.

    An empty body is not a bid request and names no device ([]).
    """
    data = decode_body(body, content_encoding, max_bytes)
    if not data:
        return []
    try:
        text = data.decode("utf-8")
        request = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # Unreadable is a ValueError
        raise Unreadable(str(exc)[:80]) from None
    if not _depth_ok(request):
        raise Unreadable("nested too deep")
    if not isinstance(request, dict):
        raise Unreadable("not a JSON object")
    device = _get(request, "device")
    if device is None:
        return []
    if not isinstance(device, dict):
        raise Unreadable("device is not an object")
    addresses = []
    for key in ("ip", "ipv6"):
        value = _get(device, key)
        if value is None or value == "":
            continue
        address = canonical(value) if isinstance(value, str) else None
        if address is None:
            raise Unreadable(f"device.{key} is not an address")
        addresses.append(address)
    return addresses
