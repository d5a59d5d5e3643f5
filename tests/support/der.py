"""DER as a tree, for certificates no issuer of ours would make but a CA-signed attacker could.

`cryptography`'s builder refuses to make most malformed certificates (a repeated extension, a
subject that repeats an attribute in one RDN, version 5), so tests build a good certificate,
parse its to-be-signed part into a tree of TLVs, change the tree, and sign it again with the
test CA's key: the result passes signature checks and reaches every parser behind them.
OCTET STRINGs that hold DER (extension values) are parsed too, so a mutation can reach a SAN.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runtime.certificates.issuance import CertificateAuthority

OCTET_STRING = 0x04
SEQUENCE = 0x30
BIT_STRING = 0x03


@dataclass
class Node:
    tag: int
    content: bytes = b""
    children: list[Node] | None = None
    """Set for constructed TLVs and for OCTET STRINGs that hold exactly one DER value or more."""
    extra: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        body = (
            b"".join(child.encode() for child in self.children) if self.children is not None else self.content
        )
        return bytes([self.tag]) + encode_length(len(body)) + body

    def walk(self) -> Iterator[tuple[Node | None, int, Node]]:
        """(parent, index, node) for every node below this one, depth first."""
        for index, child in enumerate(self.children or []):
            yield self, index, child
            yield from child.walk()


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _read(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at `at`; ValueError if it does not fit."""
    if at + 2 > len(data):
        raise ValueError("short")
    tag, first = data[at], data[at + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags are not used in certificates")
    start = at + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise ValueError("bad length")
        length, start = int.from_bytes(data[start : start + count], "big"), start + count
    if start + length > len(data):
        raise ValueError("overrun")
    return tag, start, start + length


def _parse_all(data: bytes) -> list[Node]:
    nodes, at = [], 0
    while at < len(data):
        tag, start, end = _read(data, at)
        nodes.append(_node(tag, data[start:end]))
        at = end
    return nodes


def _node(tag: int, content: bytes) -> Node:
    if tag & 0x20:
        return Node(tag, children=_parse_all(content))
    if tag == OCTET_STRING and content:
        try:
            return Node(tag, children=_parse_all(content))
        except ValueError:
            pass
    return Node(tag, content)


def parse(der: bytes) -> Node:
    tag, start, end = _read(der, 0)
    if end != len(der):
        raise ValueError("trailing data")
    return _node(tag, der[start:end])


def tbs_tree(certificate: x509.Certificate) -> Node:
    """The to-be-signed part of `certificate` as a tree."""
    return parse(certificate.tbs_certificate_bytes)


def signed(tbs: Node | bytes, ca: CertificateAuthority) -> bytes:
    """A certificate (DER) of `tbs`, with a valid signature by `ca`'s key."""
    tbs_der = tbs.encode() if isinstance(tbs, Node) else tbs
    key = ca.identity.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(tbs_der, ec.ECDSA(hashes.SHA256()))
        algorithm = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    elif isinstance(key, rsa.RSAPrivateKey):
        from cryptography.hazmat.primitives.asymmetric import padding

        signature = key.sign(tbs_der, padding.PKCS1v15(), hashes.SHA256())
        algorithm = bytes.fromhex("300d06092a864886f70d01010b0500")  # sha256WithRSAEncryption
    else:  # pragma: no cover - the test CAs are EC or RSA
        raise TypeError(type(key).__name__)
    bit_string = bytes([BIT_STRING]) + encode_length(len(signature) + 1) + b"\x00" + signature
    body = tbs_der + algorithm + bit_string
    return bytes([SEQUENCE]) + encode_length(len(body)) + body


def pem_of(der: bytes) -> bytes:
    """`der` framed as one PEM CERTIFICATE block (whether or not it parses)."""
    import base64
    import textwrap

    text = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{text}\n-----END CERTIFICATE-----\n".encode()


def resigned_with(certificate: x509.Certificate, ca: CertificateAuthority, old: bytes, new: bytes) -> bytes:
    """`certificate` with `old` replaced by `new` in its to-be-signed bytes (same length keeps the
    DER intact), signed again by `ca`: a CA-signed certificate with one field made hostile."""
    tbs = certificate.tbs_certificate_bytes
    if tbs.count(old) != 1 or len(old) != len(new):
        raise ValueError("replace exactly one occurrence, keeping the length")
    return signed(tbs.replace(old, new), ca)


def der_of(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)
