"""TLS for a private swarm's gRPC calls, with certificates that the swarm key alone makes.

Every member derives the same certificate authority from the swarm key: its ECDSA P-256 private key
is an HMAC of the key, so no one has to run a CA or hand out certificates. A node makes a fresh
key pair at each start and signs its own certificate (for the name ``dmoe-node``) with that CA;
a client does the same for a client certificate. Both sides trust only that CA (mutual TLS), and
the client checks the name. So calls are encrypted, only a holder of the swarm key can serve
them, and an outsider cannot complete a connection at all: it cannot hold a node's call slots
or make it read a request. The HMAC token of :mod:`dmoe.core.auth` still authenticates each call
inside the TLS session (and alone, with ``--no-tls``).

Why derived and not issued: the swarm key is the one secret members already share; an issued CA
would be a second secret to distribute and a server to keep up, for no protection the key does
not already give (anyone with the key can be a member anyway).
"""

from __future__ import annotations

import datetime

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dmoe.core.auth import SwarmKey

NODE_NAME = "dmoe-node"  # the name in every node certificate; clients check it, whatever the address
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dmoe swarm CA")])
_EPOCH = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)


def _ca(key: SwarmKey) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    scalar = int.from_bytes(key.tag(b"tls-ca-key"), "big") % (_P256_ORDER - 1) + 1
    private = ec.derive_private_key(scalar, ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_CA_NAME).issuer_name(_CA_NAME).public_key(private.public_key())
        .serial_number(1).not_valid_before(_EPOCH).not_valid_after(_EPOCH + datetime.timedelta(days=365 * 80))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    return private, cert


def ca_pem(key: SwarmKey) -> bytes:
    """The swarm CA's certificate, the one root a client trusts."""
    return _ca(key)[1].public_bytes(serialization.Encoding.PEM)


def node_key_and_chain(key: SwarmKey, *, client: bool = False) -> tuple[bytes, bytes]:
    """A fresh private key and its certificate (PEM), signed by the swarm CA, for a node's server
    (or, with ``client``, for a client's side of mutual TLS)."""
    ca_private, ca_cert = _ca(key)
    private = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)]))
        .issuer_name(ca_cert.subject).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NODE_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client
                                              else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()),
                       critical=False)
        .sign(ca_private, hashes.SHA256())
    )
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def server_credentials(key: SwarmKey) -> grpc.ServerCredentials:
    """A node's: its certificate, and clients must show one of the same CA (mutual TLS)."""
    return grpc.ssl_server_credentials([node_key_and_chain(key)], root_certificates=ca_pem(key),
                                       require_client_auth=True)


def channel_credentials(key: SwarmKey) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """Credentials and channel options for calls to any node of the swarm."""
    private_key, chain = node_key_and_chain(key, client=True)
    return (grpc.ssl_channel_credentials(root_certificates=ca_pem(key), private_key=private_key,
                                         certificate_chain=chain),
            [("grpc.ssl_target_name_override", NODE_NAME), ("grpc.default_authority", NODE_NAME)])
