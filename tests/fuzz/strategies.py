"""Hypothesis strategies for hostile certificates, keys, PEM text and secret values, built from
their structure, not only random bytes.

- `built_certificates`: what `cryptography`'s builder accepts (any subject attribute and text,
  multi-valued RDNs, every SAN type, odd EKUs, CA flags, validity from 1950 to 9999, big
  serials, weak keys), signed by the fuzz CA.
- `mutated_certificates`: a good leaf or CA parsed into its DER tree (`tests.support.der`), one
  to three mutations (a TLV's bytes, tag, OID, string, integer or time replaced; a TLV repeated
  or removed, at any depth, SANs included), then signed again by the fuzz CA, so the signature
  holds and every parser behind it is reached.
- `pem_texts`: BEGIN/END lines, labels, base64 and junk in any order.
- `secret_values`: the identity secret's JSON with each field drawn from the above, any JSON at
  all, deep nesting and numbers no one should send.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import ipaddress
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import assume
from hypothesis import strategies as st

from runtime import names
from runtime.certificates.issuance import CertificateAuthority
from tests.support import der

CA = CertificateAuthority.create("development")
"""The fuzz CA: every fuzzed certificate is signed by it, so it is the bundle of every check."""
LEAVES = [
    CA.issue(
        "development",
        names.SERVER,
        extra_sans=("localhost", "127.0.0.1"),
    ),
    CA.issue("development", names.API),
]
KEYS = {
    "p256": LEAVES[1].private_key,
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "p521": ec.generate_private_key(ec.SECP521R1()),
    "secp256k1": ec.generate_private_key(ec.SECP256K1()),
    "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - a weak key to refuse
    "rsa2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}

_NAME_OIDS = [
    NameOID.COMMON_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.DOMAIN_COMPONENT,
    NameOID.SERIAL_NUMBER,
    NameOID.EMAIL_ADDRESS,
    NameOID.USER_ID,
    NameOID.TITLE,
    NameOID.LOCALITY_NAME,
]
HOSTILE_TEXT = st.one_of(
    st.text(min_size=1, max_size=24),
    st.sampled_from(
        [
            "spiffe://hokusai/production/api",
            "api.hokusai-production.local",
            ',+"\\<>;=#',
            " leading and trailing ",
            "\x00nul",
            "\u202eright-to-left",
            "*.hokusai-production.local",
            "a" * 200,
        ]
    ),
)
_OIDS = [
    bytes.fromhex(h)
    for h in (
        "551d11",  # subjectAltName
        "551d13",  # basicConstraints
        "551d0f",  # keyUsage
        "551d25",  # extKeyUsage
        "551d0e",  # subjectKeyIdentifier
        "551d23",  # authorityKeyIdentifier
        "551d1e",  # nameConstraints
        "550403",  # commonName
        "55040b",  # organizationalUnitName
        "2a8648ce3d0201",  # id-ecPublicKey
        "2a864886f70d010101",  # rsaEncryption
        "2b6570",  # Ed25519
        "2a8648ce3d040302",  # ecdsa-with-SHA256
        "2b06010505070380",  # a truncated OID (the last byte continues)
        "",
    )
]
_TIMES = [b"000000000000Z", b"991231235959Z", b"500101000000Z", b"99991231235959Z", b"2026X", b""]
_INTEGERS = [b"", b"\x00", b"\xff", b"\x80", b"\x00\x00", b"\x7f" * 40, b"\x01" * 200]
_STRING_TAGS = (0x0C, 0x13, 0x16, 0x14, 0x1E, 0x1C, 0x1A)
_TAGS = [
    0x01,
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x0C,
    0x13,
    0x17,
    0x18,
    0x1E,
    0x30,
    0x31,
    0x80,
    0x81,
    0x82,
    0x86,
    0x87,
    0x89,
    0xA0,
    0xA3,
    0xA4,
]


def _attempt(build):
    """`build()`, or an example hypothesis throws away when the builder itself refuses it."""
    try:
        return build()
    except (ValueError, TypeError, UnicodeError):
        assume(False)


@st.composite
def _names(draw) -> x509.Name:
    attribute = st.tuples(st.sampled_from(_NAME_OIDS), HOSTILE_TEXT).map(
        lambda pair: _attempt(lambda: x509.NameAttribute(*pair))
    )
    rdns = draw(st.lists(st.lists(attribute, min_size=1, max_size=3), max_size=4))
    return _attempt(lambda: x509.Name([x509.RelativeDistinguishedName(r) for r in rdns]))


_GENERAL_NAMES = st.one_of(
    st.tuples(st.sampled_from([x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name]), HOSTILE_TEXT),
    st.tuples(st.just(x509.IPAddress), st.ip_addresses() | st.just(ipaddress.ip_network("10.0.0.0/8"))),
    st.tuples(
        st.just(x509.RegisteredID), st.sampled_from([NameOID.COMMON_NAME, ExtendedKeyUsageOID.CLIENT_AUTH])
    ),
).map(lambda pair: _attempt(lambda: pair[0](pair[1])))
"""Every GeneralName a SAN may hold (OtherName aside), with hostile text where text goes."""


@st.composite
def built_certificates(draw) -> bytes:
    """A certificate the builder accepts, with every field drawn; DER, signed by the fuzz CA."""
    subject = draw(_names())
    key = KEYS[draw(st.sampled_from(sorted(KEYS)))]
    start = draw(st.datetimes(dt.datetime(1950, 1, 1), dt.datetime(9998, 1, 1), timezones=st.just(dt.UTC)))
    length = draw(st.timedeltas(dt.timedelta(seconds=-86400), dt.timedelta(days=400)))
    builder = _attempt(
        lambda: (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(draw(st.sampled_from([CA.certificate.subject, subject])))
            .public_key(key.public_key())
            .serial_number(draw(st.integers(1, 2**159 - 1)))
            .not_valid_before(start)
            .not_valid_after(min(start + length, dt.datetime(9999, 12, 31, tzinfo=dt.UTC)))
        )
    )
    sans = draw(st.lists(_GENERAL_NAMES, max_size=4))
    if sans:
        builder = _attempt(
            lambda: builder.add_extension(x509.SubjectAlternativeName(sans), critical=draw(st.booleans()))
        )
    usages = draw(
        st.lists(
            st.sampled_from([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH, NameOID.TITLE])
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if draw(st.booleans()):
        is_ca = draw(st.booleans())
        builder = builder.add_extension(
            x509.BasicConstraints(
                ca=is_ca, path_length=draw(st.none() | st.integers(0, 3)) if is_ca else None
            ),
            critical=True,
        )
    if draw(st.booleans()):
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(CA.certificate.public_key()), critical=False
        )
    certificate = _attempt(lambda: builder.sign(CA.identity.private_key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.DER)


def _mutate(draw, tree: der.Node) -> None:
    nodes = list(tree.walk())
    parent, index, node = draw(st.sampled_from(nodes))
    operation = draw(st.sampled_from(["bytes", "tag", "repeat", "remove", "typed"]))
    if operation == "bytes":
        node.children, node.content = None, draw(st.binary(max_size=40))
    elif operation == "tag":
        node.tag = draw(st.sampled_from(_TAGS))
    elif operation == "repeat":
        parent.children.insert(index, copy.deepcopy(node))
    elif operation == "remove":
        del parent.children[index]
    elif node.children is None:  # "typed": a value of the node's own kind
        if node.tag == 0x06:
            node.content = draw(st.sampled_from(_OIDS))
        elif node.tag in (0x17, 0x18):
            node.content = draw(st.sampled_from(_TIMES))
        elif node.tag == 0x02:
            node.content = draw(st.sampled_from(_INTEGERS))
        elif node.tag in _STRING_TAGS:
            node.content = draw(HOSTILE_TEXT).encode("utf-8", "surrogatepass")
        else:
            node.content = draw(st.binary(max_size=8))


@st.composite
def mutated_certificates(draw) -> bytes:
    """A good certificate with one to three structural mutations, signed again by the fuzz CA."""
    base = draw(st.sampled_from([CA.certificate, *(leaf.certificate for leaf in LEAVES)]))
    tree = der.tbs_tree(base)
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, tree)
    return der.signed(tree, CA)


hostile_certificates = st.one_of(built_certificates(), mutated_certificates())
"""DER of any hostile certificate signed by the fuzz CA."""


@st.composite
def mutated_private_keys(draw) -> bytes:
    """A PKCS#8 key's DER tree mutated (keys carry no signature), as PEM."""
    key = KEYS[draw(st.sampled_from(["p256", "rsa1024"]))]
    tree = der.parse(
        key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for _ in range(draw(st.integers(1, 2))):
        _mutate(draw, tree)
    body = base64.encodebytes(tree.encode())
    return b"-----BEGIN PRIVATE KEY-----\n" + body + b"-----END PRIVATE KEY-----\n"


_LABELS = st.sampled_from(
    ["CERTIFICATE", "PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "X", ""]
)
_TOKENS = st.one_of(
    _LABELS.map(lambda label: f"-----BEGIN {label}-----\n"),
    _LABELS.map(lambda label: f"-----END {label}-----\n"),
    st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode() + "\n"),
    st.sampled_from(["\n", "\r\n", " ", "-----", "=====", "Bag Attributes\n", "-----BEGIN", "-----END CERT"]),
    st.text(max_size=16),
    st.just(der.pem_of(LEAVES[1].certificate.public_bytes(serialization.Encoding.DER)).decode()),
)
pem_texts = st.lists(_TOKENS, max_size=12).map("".join)
"""PEM-shaped text: markers, labels, base64 and junk in any order."""


def _json_values():
    primitives = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16)
    return st.recursive(
        primitives,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


@st.composite
def _identity_documents(draw) -> str:
    certificate = draw(
        st.one_of(
            hostile_certificates.map(lambda d: der.pem_of(d).decode()),
            pem_texts,
            st.just(LEAVES[1].certificate_pem().decode()),
        )
    )
    key = draw(
        st.one_of(
            st.just(LEAVES[1].private_key_pem().decode()),
            mutated_private_keys().map(bytes.decode),
            pem_texts,
        )
    )
    schema = draw(
        st.one_of(
            st.just(names.SECRET_SCHEMA_VERSION),
            st.integers(),
            st.floats(),
            st.booleans(),
            st.none(),
            st.text(max_size=4),
            st.just(10**5000),
        )
    )
    document = {"schema": schema, "certificate": certificate, "private_key": key}
    for field in draw(st.lists(st.sampled_from(sorted(document)), max_size=2, unique=True)):
        document[field] = draw(_json_values())
    for field in draw(st.lists(st.sampled_from(sorted(document)), max_size=1)):
        del document[field]
    return _dumps(document)


def _dumps(document) -> str:
    import sys

    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # so the fuzz can write a number the reader must refuse
    try:
        return json.dumps(document)
    finally:
        sys.set_int_max_str_digits(limit)


secret_values = st.one_of(
    _identity_documents(),
    _json_values().map(_dumps),
    st.integers(1, 40_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 20_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.text(max_size=64),
)
"""What an `<identity>-identity` secret's SecretString could hold, from our shape to anything."""
