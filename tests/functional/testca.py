"""
A certificate authority made for a test (``cryptography``, in a directory):
a CA certificate and leaf certificates it signs, written as PEM files the
way an operator fills ``[tls] certificates``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TestCA", "common_name", "spki_hash"]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def common_name(certificate_der_or_pem: bytes) -> str:
    """:return: the subject's common name of a DER or PEM certificate."""
    if certificate_der_or_pem.startswith(b"-----"):
        certificate = x509.load_pem_x509_certificate(certificate_der_or_pem)
    else:
        certificate = x509.load_der_x509_certificate(certificate_der_or_pem)
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def spki_hash(pem: bytes) -> str:
    """:return: base64 SHA-256 of a PEM certificate's public key (Chromium's ``--ignore-certificate-errors-spki-list``)."""
    public = x509.load_pem_x509_certificate(pem).public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class TestCA:
    """
    :param directory: where ``ca.pem`` is written.
    """

    __test__ = False  # not a test case, whatever pytest thinks of the name

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name("rexecpf test CA"))
            .issuer_name(_name("rexecpf test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.path = self.directory / "ca.pem"
        self.path.write_bytes(self.pem)

    def issue(self, common: str, *names: str) -> tuple[bytes, bytes]:
        """
        :param common: the subject's common name, and its first DNS name.
        :param names: more DNS names.
        :return: (the certificate then the CA's, as PEM; the private key as PEM).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in (common, *names)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM) + self.pem, _pem_key(key)

    def write(self, path: str | Path, common: str, *names: str, separate_key: bool = False) -> bytes:
        """
        Write a certificate for ``common`` (and ``names``) to ``path``, with
        its key in the same file or, with ``separate_key``, beside it as
        ``.key``; written with a rename, as an operator's tool would.

        :return: the certificate chain (PEM).
        """
        path = Path(path)
        chain, key = self.issue(common, *names)
        if separate_key:
            _replace(path.with_suffix(".key"), key)
            _replace(path, chain)
        else:
            _replace(path, chain + key)
        return chain


def _replace(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
