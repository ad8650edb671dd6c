# -*- test-case-name: tests.test_domains -*-
"""
Custom domains and stable names of forwards: what a valid domain and slug
are, which names belong to the service itself, who may claim domains, and
the proof of ownership (a DNS TXT record ``_rexecpf.{domain}`` holding a
token made for the user and the domain).

A domain is *verified* once its TXT record was seen (or at once with
``[domains] verify = false``).  Only a verified domain is claimed (no other
forward may have it) and routed: so nobody can squat a domain they cannot
prove, and of several users naming the same domain the first to prove it
wins.  A verified domain stays verified while its forward lives.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexecpf.config import resolver_address
from rexecpf.model import INVALID_DOMAIN, INVALID_SLUG

if TYPE_CHECKING:
    from twisted.names import dns

__all__ = [
    "DomainRules",
    "TXTVerifier",
    "TXT_PREFIX",
    "check_slug",
    "normalise_domain",
    "slug_label",
    "split_slug_label",
    "verification_token",
]

_log = Logger()

#: The TXT record that proves a domain: ``_rexecpf.{domain}``.
TXT_PREFIX = "_rexecpf."

#: How long each DNS question waits for an answer (seconds, then one retry).
LOOKUP_TIMEOUT = (1, 2)

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_SLUG = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?\Z")
#: What separates a slug from its user in the stable host's first label.
SLUG_SEPARATOR = "--"


def normalise_domain(value: Any) -> str:
    """
    :return: ``value`` as a domain name: lowercase, one trailing dot
        dropped (``app.example.com.`` is ``app.example.com``).
    :raises APIError: 400 Invalid domain unless it is a host name (RFC 1123:
        at most 253 characters, two or more labels of 1-63 letters, digits
        and inner hyphens, a last label that is not all digits): no IP
        address, no wildcard, no port, non-ASCII only in its ``xn--`` form.
    """
    if not isinstance(value, str):
        raise INVALID_DOMAIN(f"a domain must be a string, got {type(value).__name__}")
    shown = value[:80]
    if not value.isascii():
        raise INVALID_DOMAIN(f"{shown!r} is not ASCII: give an internationalised name in its xn-- form")
    text = value.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 253:
        raise INVALID_DOMAIN(f"{shown!r} is not a host name of 1-253 characters")
    labels = text.split(".")
    if len(labels) < 2:
        raise INVALID_DOMAIN(f"{shown!r} is not a fully qualified host name (one label)")
    for label in labels:
        if not _LABEL.match(label):
            raise INVALID_DOMAIN(
                f"{shown!r} is not a host name: each label is 1-63 letters, digits and hyphens, "
                "not starting or ending with a hyphen"
            )
    if labels[-1].isdigit():
        raise INVALID_DOMAIN(f"{shown!r} is an IP address or ends in a numeric label, not a host name")
    return text


def check_slug(value: Any) -> str:
    """
    :return: ``value``, a valid slug.
    :raises APIError: 400 Invalid slug unless it is 1-40 lowercase letters,
        digits and hyphens, neither starting nor ending with a hyphen, with
        no ``--`` (which separates the slug from the user in its host).
    """
    if not isinstance(value, str) or not _SLUG.match(value) or SLUG_SEPARATOR in value:
        shown = value[:60] if isinstance(value, str) else type(value).__name__
        raise INVALID_SLUG(
            f"slug {shown!r}: 1-40 lowercase letters, digits and hyphens, no leading or trailing "
            "hyphen, no '--'"
        )
    return value


def slug_label(slug: str, user: str) -> str:
    """:return: the first label of a stable host, ``{slug}--{user}``."""
    return f"{slug}{SLUG_SEPARATOR}{user}"


def split_slug_label(label: str) -> tuple[str, str] | None:
    """:return: ``(slug, user)`` of a stable host's first label, or ``None``."""
    slug, separator, user = label.partition(SLUG_SEPARATOR)
    if not separator or not slug or not user or not _SLUG.match(slug):
        return None
    return slug, user


def verification_token(key: bytes, user: str, domain: str) -> str:
    """
    :return: the token that proves ``domain`` for ``user`` (32 lowercase
        letters and digits): the same for the same user and domain (so a
        record made once keeps working for every later forward), another
        for anyone else.
    """
    digest = hmac.new(key, f"{user}\0{domain}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest[:20]).decode("ascii").lower()


@attrs.frozen
class DomainRules:
    """
    Who may claim custom domains, and which names may not be claimed.

    :ivar users: the users of ``[auth] custom_domains`` (``"*"``: everyone).
    :ivar verify: whether a domain needs its TXT record (``[domains] verify``).
    :ivar per_forward: ``[domains] per_forward``.
    :ivar reserved: the service's own host names (``public_url``'s host, the
        API host): refused, as are ``proxy_domain`` and every name under it.
    :ivar proxy_domain: ``[server] proxy_domain`` (empty: no stable names).
    """

    users: frozenset[str] = frozenset()
    verify: bool = True
    per_forward: int = 10
    reserved: frozenset[str] = frozenset()
    proxy_domain: str = ""

    @classmethod
    def from_config(cls, users: tuple[str, ...], verify: bool, per_forward: int, public_url: str, proxy_domain: str) -> DomainRules:
        host = (urlsplit(public_url).hostname or "").lower().rstrip(".")
        return cls(frozenset(users), verify, per_forward, frozenset({host} if host else ()), proxy_domain)

    def allowed(self, user: str) -> bool:
        """:return: whether ``user`` may give forwards custom domains."""
        return "*" in self.users or user in self.users

    def refuse_reserved(self, domain: str) -> None:
        """:raises APIError: 400 Invalid domain for a name of the service itself."""
        proxy = self.proxy_domain
        if domain in self.reserved or (proxy and (domain == proxy or domain.endswith("." + proxy))):
            raise INVALID_DOMAIN(f"{domain} is a name of this service itself, not a custom domain")
        if domain == "localhost" or domain.endswith(".localhost"):
            raise INVALID_DOMAIN(f"{domain} is a loopback name, not a custom domain")


class TXTVerifier:
    """
    Looks for a domain's proof: a TXT record ``_rexecpf.{domain}`` one of
    whose values is the token.

    :param resolver: a :class:`twisted.names` resolver, or a function that
        makes one on first use (:meth:`for_address`).

    ``twisted.names`` (about 2 MiB resident) is imported at the first
    lookup, so that a daemon whose users claim no custom domain never loads it.
    """

    def __init__(self, resolver: Any) -> None:
        self._resolver = resolver if not callable(resolver) else None
        self._make = resolver if callable(resolver) else None

    @classmethod
    def for_address(cls, reactor: Any, address: str) -> TXTVerifier:
        """
        :param address: ``[domains] resolver``: ``host[:port]``, or empty
            for the system's resolvers.
        """
        # Made on first use: the system's resolver re-reads resolv.conf every
        # minute from then on (a timer that a daemon without custom domains
        # need not run).
        servers = [resolver_address(address)] if address else None

        def make() -> Any:
            from twisted.names import client

            if servers is None:
                return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
            return client.Resolver(servers=servers, reactor=reactor)

        return cls(make)

    def verify(self, domain: str, token: str) -> Deferred[bool]:
        """
        :return: a Deferred firing with whether the record holds ``token``
            (``False`` also when DNS does not answer: logged, never raised).
        """
        from twisted.names import dns
        from twisted.names.error import DomainError

        name = TXT_PREFIX + domain

        def answered(result: tuple[list[dns.RRHeader], list[Any], list[Any]]) -> bool:
            answers, _, _ = result
            for record in answers:
                if record.type != dns.TXT:
                    continue
                payload = record.payload
                assert isinstance(payload, dns.Record_TXT)
                value = b"".join(payload.data).decode("utf-8", "replace").strip()
                if hmac.compare_digest(value.encode(), token.encode()):
                    return True
            return False

        def failed(failure: Failure) -> bool:
            if not failure.check(DomainError):
                _log.warn(
                    "no TXT answer for {name}: {error}", name=name, error=failure.getErrorMessage() or failure.type
                )
            return False

        if self._resolver is None:
            assert self._make is not None
            self._resolver = self._make()
        d: Deferred[Any] = self._resolver.lookupText(name, timeout=LOOKUP_TIMEOUT)
        return d.addCallbacks(answered, failed)
