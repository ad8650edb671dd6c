# -*- test-case-name: tests.test_tls -*-
"""
TLS with a certificate per host name (SNI) for the ``ssl:`` listen endpoints,
from a directory the operator fills (``[tls] certificates``).

Imported only when ``[tls] certificates`` is set: it loads OpenSSL.

The directory holds one ``{host}.pem`` per host name: the certificate, the
rest of its chain, and its private key, either in the same file or in
``{host}.key`` beside it.  ``_wildcard.{domain}.pem`` serves ``*.{domain}``
(one label: ``a.example.com``, not ``b.a.example.com``).  A host's own file
wins over a wildcard.  A client that sends no server name, or one with no
file, gets the endpoint's own certificate (``privateKey=``/``certKey=``).

:meth:`CertificateDirectory.load` reads the directory again (on ``SIGHUP``):
new and changed files serve new connections; removed files stop being served;
a file that does not load (unreadable, no key, a key that does not match, a
certificate that does not name its host) is logged by name, and what that
file served before stays.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, wrapServerTLS
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions, DiffieHellmanParameters
from twisted.logger import Logger
from twisted.python.filepath import FilePath

__all__ = ["CertificateDirectory", "sni_server_endpoint"]

_log = Logger()

#: A file larger than this is not a certificate chain and key: not read.
MAX_PEM_BYTES = 1024 * 1024
#: The prefix of a wildcard certificate's file name (``*`` is awkward in file names).
WILDCARD_PREFIX = "_wildcard."
_LABEL = re.compile(r"[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?\Z")


class CertificateError(Exception):
    """A certificate file that cannot be served; ``str(error)`` says why."""


def host_of_file(name: str) -> str | None:
    """
    :param name: a file name in the directory.
    :return: the host name ``name`` serves (``*.example.com`` for
        ``_wildcard.example.com.pem``), or ``None`` if it is no ``.pem`` file.
    :raises CertificateError: for a ``.pem`` file not named after a host.
    """
    if not name.endswith(".pem"):
        return None
    stem = name[: -len(".pem")].lower()
    wildcard = stem.startswith(WILDCARD_PREFIX)
    domain = stem[len(WILDCARD_PREFIX) :] if wildcard else stem
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < (2 if wildcard else 1) or not all(map(_LABEL.match, labels)):
        raise CertificateError("the file name is not a host name and .pem (or _wildcard.DOMAIN.pem)")
    return f"*.{domain}" if wildcard else domain


def _covers(pattern: str, host: str) -> bool:
    """:return: whether a certificate's DNS name ``pattern`` covers ``host`` (RFC 6125, one-label wildcards)."""
    pattern = pattern.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*.") and not host.startswith("*."):
        return host.partition(".")[2] == pattern[2:] and "." in pattern[2:]
    return False


def load_pem(chain_path: Path, key_path: Path | None, host: str | None = None) -> CertificateOptions:
    """
    :param chain_path: the certificate, then the rest of its chain (and
        maybe the private key).
    :param key_path: the private key's file, or ``None``: in ``chain_path``.
    :param host: the host name the certificate must name (DNS names of its
        subjectAltName), or ``None`` for no check (an endpoint's own).
    :return: the options serving it (their context made, so a key that does
        not match the certificate is found now).
    :raises CertificateError: saying what is wrong.
    """
    chain_data = _read(chain_path)
    key_data = _read(key_path) if key_path is not None else chain_data
    try:
        chain = x509.load_pem_x509_certificates(chain_data)
    except ValueError:
        raise CertificateError(f"{chain_path.name}: no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as error:
        where = key_path.name if key_path is not None else chain_path.name
        raise CertificateError(f"{where}: no usable PEM private key (unencrypted): {error}") from None
    if host is not None:
        names = _dns_names(chain[0])
        if not any(_covers(name, host) for name in names):
            raise CertificateError(
                f"{chain_path.name}: the certificate does not name {host} (it names {', '.join(names) or 'nothing'})"
            )
    try:
        options = CertificateOptions(
            privateKey=key,  # type: ignore[arg-type]
            certificate=chain[0],  # type: ignore[arg-type]
            extraCertChain=chain[1:],  # type: ignore[arg-type]  # pyOpenSSL >= 25 takes cryptography objects
        )
        options.getContext()
    except (SSL.Error, ValueError, TypeError) as error:
        raise CertificateError(f"{chain_path.name}: the key does not match the certificate ({error})") from None
    return options


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as error:
        raise CertificateError(f"{path.name}: cannot read: {error.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(f"{path.name}: larger than {MAX_PEM_BYTES} bytes")
    return data


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(name) for name in extension.value.get_values_for_type(x509.DNSName)]


@attrs.frozen
class _Loaded:
    """One file's certificate, and what the file looked like when read."""

    signature: tuple[Any, ...]
    options: CertificateOptions


class CertificateDirectory:
    """
    The certificates of a directory, by host name.

    :param path: the directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files: dict[str, _Loaded] = {}
        self._by_host: dict[str, SSL.Context] = {}

    def load(self) -> tuple[int, int]:
        """
        Read the directory again: files that changed (or are new) are read,
        removed ones dropped; one that does not load is logged and what it
        served before is kept.  Never raises for a file; a directory that
        cannot be listed is logged and changes nothing.

        :return: how many host names are served, and how many files failed.
        """
        try:
            names = sorted(entry.name for entry in os.scandir(self.path) if entry.name.endswith(".pem"))
        except OSError as error:
            _log.error(
                "tls: cannot read the certificate directory {path}: {error}; certificates kept",
                path=str(self.path), error=error.strerror,
            )
            return len(self._by_host), 1
        files: dict[str, _Loaded] = {}
        failed = 0
        for name in names:
            try:
                host = host_of_file(name)
                if host is None:
                    continue
                key_path = self.path / (name[: -len(".pem")] + ".key")
                signature = (_stat(self.path / name), _stat(key_path))
                previous = self._files.get(name)
                if previous is not None and previous.signature == signature:
                    files[name] = previous
                    continue
                options = load_pem(self.path / name, key_path if signature[1] is not None else None, host)
                files[name] = _Loaded(signature, options)
            except CertificateError as error:
                failed += 1
                kept = self._files.get(name)
                if kept is not None:
                    files[name] = kept
                _log.error(
                    "tls: {path}/{name}: {error}; {outcome}",
                    path=str(self.path), name=name, error=str(error).removeprefix(f"{name}: "),
                    outcome="the certificate loaded before stays" if kept is not None else "not served",
                )
        self._files = files
        self._by_host = {
            host: loaded.options.getContext()
            for name, loaded in files.items()
            if (host := host_of_file(name)) is not None
        }
        _log.info(
            "tls: {count} certificates from {path} ({failed} files failed)",
            count=len(self._by_host), path=str(self.path), failed=failed,
        )
        return len(self._by_host), failed

    def hosts(self) -> list[str]:
        """:return: the host names served (``*.domain`` for wildcards), sorted."""
        return sorted(self._by_host)

    def context_for(self, server_name: bytes | None) -> SSL.Context | None:
        """
        :param server_name: what the client sent as its server name (SNI),
            or ``None``.
        :return: the context of the host's own certificate, else of the
            wildcard covering it, else ``None`` (the endpoint's own).
        """
        if not server_name:
            return None
        host = server_name.decode("ascii", "replace").lower().rstrip(".")
        found = self._by_host.get(host)
        if found is None and "." in host:
            found = self._by_host.get("*." + host.partition(".")[2])
        return found


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CertificateError(f"{path.name}: cannot read: {error.strerror}") from None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


#: The arguments of an ``ssl:`` server endpoint string, in positional order
#: (as Twisted's own parser takes them).
_SSL_ARGUMENTS = ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain", "dhParameters")


def parse_ssl_description(description: str) -> dict[str, str]:
    """
    :param description: an ``ssl:`` server endpoint string.
    :return: its arguments by name (``port`` always; defaults not filled in).
    :raises ValueError: saying what is wrong.
    """
    kind, _, rest = description.partition(":")
    if kind != "ssl":
        raise ValueError("not an ssl: endpoint")
    arguments: dict[str, str] = {}
    positional = 0
    for part in re.split(r"(?<!\\):", rest):
        if not part:
            continue
        name, equals, value = part.partition("=")
        if not equals:
            if positional >= len(_SSL_ARGUMENTS):
                raise ValueError(f"too many arguments: {part!r}")
            name, value = _SSL_ARGUMENTS[positional], part
            positional += 1
        if name not in _SSL_ARGUMENTS:
            raise ValueError(f"unknown argument {name!r}")
        if name in arguments:
            raise ValueError(f"{name} given twice")
        arguments[name] = re.sub(r"\\(.)", r"\1", value)
    if "sslmethod" in arguments:
        raise ValueError("sslmethod is not supported with [tls] certificates (the TLS versions are Twisted's)")
    if not arguments.get("port", "").isdigit():
        raise ValueError("the port must be a number")
    if not arguments.get("backlog", "50").isdigit():
        raise ValueError("backlog must be a number")
    return arguments


def sni_server_endpoint(
    reactor: Any, description: str, directory: CertificateDirectory, tcp: IStreamServerEndpoint | None = None
) -> IStreamServerEndpoint:
    """
    :param description: an ``ssl:`` server endpoint string (``port``,
        ``interface``, ``backlog``, ``privateKey``, ``certKey``,
        ``extraCertChain``, ``dhParameters``, as Twisted reads them).
    :param directory: the certificates served by host name.
    :param tcp: the endpoint TLS runs on (a worker's inherited socket);
        by default, one on the string's ``port`` and ``interface``.
    :return: an endpoint listening like ``description``, whose certificate
        is the one of ``directory`` for the server name the client sends,
        else the endpoint's own.
    :raises ValueError: saying what is wrong with the string or its files.
    """
    arguments = parse_ssl_description(description)
    private_key = Path(arguments.get("privateKey", "server.pem"))
    certificate = Path(arguments.get("certKey", str(private_key)))
    try:
        own = load_pem(certificate, private_key)
    except CertificateError as error:
        raise ValueError(str(error)) from None
    extra: list[Any] = list(own.extraCertChain)
    if "extraCertChain" in arguments:
        try:
            chain_data = _read(Path(arguments["extraCertChain"]))
            extra += x509.load_pem_x509_certificates(chain_data)
        except (CertificateError, ValueError) as error:
            raise ValueError(f"extraCertChain: {error}") from None
    dh = None
    if "dhParameters" in arguments:
        dh = DiffieHellmanParameters.fromFile(FilePath(arguments["dhParameters"]))
    lookup: Callable[[bytes | None], SSL.Context | None] = directory.context_for
    try:
        options = CertificateOptions(
            privateKey=own.privateKey,
            certificate=own.certificate,
            extraCertChain=extra,
            dhParameters=dh,
            contextForServerName=lookup,
        )
    except TypeError:
        raise ValueError("[tls] certificates needs a Twisted whose CertificateOptions takes contextForServerName") from None
    try:
        options.getContext()
    except (SSL.Error, OSError) as error:
        raise ValueError(f"dhParameters: cannot use {arguments.get('dhParameters')}: {error}") from None
    if tcp is None:
        port = int(arguments["port"])
        backlog = int(arguments.get("backlog", "50"))
        interface = arguments.get("interface", "")
        if ":" in interface:
            tcp = TCP6ServerEndpoint(reactor, port, backlog, interface)
        else:
            tcp = TCP4ServerEndpoint(reactor, port, backlog, interface)
    return wrapServerTLS(options, tcp)
