"""``gatekeeper smime sign|encrypt|sign-encrypt|decrypt|verify``: S/MIME by hand, for admins and scripts.

The message comes from standard input (or ``--in FILE``) and the result goes to
standard output (or ``--out FILE``). Keys come from a PKCS#12 file (``--p12 FILE
--password-file F``), recipients' certificates from PEM/DER files (``--to CERT``,
repeatable), trust anchors from ``--ca FILE`` (repeatable; without it, ``[trust]`` of
the configuration when there is one). ``decrypt`` and ``verify`` write the revealed
message, can write the trust result as JSON (``--report FILE``), and exit 0 only when
the result is valid (decrypted, and every signature valid; ``verify`` also needs one).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from gatekeeper import smime
from gatekeeper.admin import cli
from gatekeeper.cms import algorithms as alg
from gatekeeper.errors import ConfigError
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.trust import TrustValidator, load_certificates, validator_from_config

MAX_INPUT = smime.MAX_MESSAGE_SIZE
MAX_KEY_FILE = 1024 * 1024


def register(subparsers: Any) -> None:
    """Add ``smime`` and its sub-commands."""
    command = subparsers.add_parser("smime", help="sign, encrypt, decrypt and verify S/MIME messages by hand")
    commands = command.add_subparsers(title="smime commands", dest="smime_command", metavar="COMMAND", required=True)

    signing = commands.add_parser("sign", help="sign a message (multipart/signed unless --opaque)")
    _io(signing)
    _signer(signing, required=True)
    _sign_options(signing)
    signing.set_defaults(handler=run_sign)

    encrypting = commands.add_parser("encrypt", help="encrypt a message to --to certificates")
    _io(encrypting)
    _encrypt_options(encrypting)
    encrypting.set_defaults(handler=run_encrypt)

    both = commands.add_parser("sign-encrypt", help="sign, then encrypt, in one step")
    _io(both)
    _signer(both, required=True)
    _sign_options(both)
    _encrypt_options(both)
    both.set_defaults(handler=run_sign_encrypt)

    decrypting = commands.add_parser("decrypt", help="decrypt (and verify what is signed inside)")
    _io(decrypting)
    _signer(decrypting, required=True)
    _verify_options(decrypting)
    decrypting.set_defaults(handler=run_decrypt)

    verifying = commands.add_parser("verify", help="verify a signed message")
    _io(verifying)
    _signer(verifying, required=False)
    _verify_options(verifying)
    verifying.set_defaults(handler=run_verify)


def _io(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", metavar="FILE", help="read the message from FILE (default: stdin)")
    parser.add_argument("--out", dest="output", metavar="FILE", help="write the result to FILE (default: stdout)")


def _signer(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--p12", metavar="FILE", required=required, help="your key and certificate (PKCS#12)")
    parser.add_argument("--password-file", metavar="FILE", help="the PKCS#12 password (default: ask)")


def _sign_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opaque", action="store_true", help="application/pkcs7-mime signed-data")
    parser.add_argument("--digest", choices=alg.SIGNING_DIGESTS, default="sha256")
    parser.add_argument("--pss", action="store_true", help="RSASSA-PSS instead of PKCS#1 v1.5 (RSA keys)")


def _encrypt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", action="append", metavar="CERT", required=True, help="a recipient's certificate")
    parser.add_argument("--cipher", choices=alg.PRODUCED_CIPHERS, default="aes256-cbc")
    parser.add_argument("--oaep", action="store_true", help="RSA-OAEP (SHA-256) key transport")


def _verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", action="append", metavar="FILE", help="a trusted CA certificate file")
    parser.add_argument("--sender", metavar="ADDRESS", help="the expected signer (default: the From header)")
    parser.add_argument("--report", metavar="FILE", help="write the result as JSON to FILE")


# -- handlers ------------------------------------------------------------------------------


def run_sign(args: argparse.Namespace) -> int:
    """``smime sign``."""
    message = read_input(args)
    signed = smime.sign(
        message,
        load_p12(args.p12, args.password_file),
        detached=not args.opaque,
        digest=args.digest,
        scheme="pss" if args.pss else "pkcs1v15",
    )
    write_output(args, signed)
    return 0


def run_encrypt(args: argparse.Namespace) -> int:
    """``smime encrypt``."""
    message = read_input(args)
    encrypted = smime.encrypt(
        message,
        _recipients(args.to),
        cipher=args.cipher,
        key_transport="rsa-oaep" if args.oaep else "rsa-pkcs1v15",
    )
    write_output(args, encrypted)
    return 0


def run_sign_encrypt(args: argparse.Namespace) -> int:
    """``smime sign-encrypt``."""
    message = read_input(args)
    protected = smime.sign_and_encrypt(
        message,
        load_p12(args.p12, args.password_file),
        _recipients(args.to),
        detached=not args.opaque,
        digest=args.digest,
        scheme="pss" if args.pss else "pkcs1v15",
        cipher=args.cipher,
        key_transport="rsa-oaep" if args.oaep else "rsa-pkcs1v15",
    )
    write_output(args, protected)
    return 0


def run_decrypt(args: argparse.Namespace) -> int:
    """``smime decrypt``: exit 0 when decrypted and every signature inside is valid."""
    return _open(args, require_signature=False)


def run_verify(args: argparse.Namespace) -> int:
    """``smime verify``: exit 0 only when signed and every signature is valid."""
    return _open(args, require_signature=True)


def _open(args: argparse.Namespace, *, require_signature: bool) -> int:
    message = read_input(args)
    keys = [load_p12(args.p12, args.password_file)] if args.p12 else []
    sender = args.sender or sender_of(message)
    opened = smime.open_message(message, keys, _validator(args), sender)
    valid = all(s.trust.ok for s in opened.signatures) and (opened.signed or not require_signature)
    if require_signature is False and not opened.encrypted:
        valid = False  # "decrypt" of a message that was not encrypted to us
    if args.report:
        Path(args.report).write_text(json.dumps(report(opened, sender, valid), indent=2) + "\n", encoding="utf-8")
    write_output(args, opened.message)
    return 0 if valid else 1


def report(opened: smime.Opened, sender: str | None, valid: bool) -> dict[str, object]:
    """The JSON report of an opened message: layers, decryption, every signature's trust."""
    return {
        "valid": valid,
        "sender": sender,
        "layers": list(opened.layers),
        "decryptions": [
            {
                "key_id": d.key_id,
                "layer": d.layer,
                "cipher": d.cipher,
                "key_encryption": d.key_encryption,
                "recipients": d.recipient_count,
            }
            for d in opened.decryptions
        ],
        "signatures": [
            {
                "signer": s.certificate.subject.rfc4514_string() if s.certificate else None,
                "status": s.trust.status.value,
                "digest": s.digest_algorithm,
                "signature_algorithm": s.signature_algorithm,
                "weak": list(s.weak),
                "signing_time": s.signing_time.isoformat() if s.signing_time else None,
                "capabilities": list(s.capabilities) if s.capabilities is not None else None,
                "trust": s.trust.to_json(),
            }
            for s in opened.signatures
        ],
    }


# -- helpers -------------------------------------------------------------------------------


def read_input(args: argparse.Namespace) -> bytes:
    """The message from ``--in`` or standard input, bounded."""
    if args.input:
        with open(args.input, "rb") as handle:
            data = handle.read(MAX_INPUT + 1)
    else:
        data = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise cli.UsageError(f"the message is larger than {MAX_INPUT} bytes")
    return data


def write_output(args: argparse.Namespace, data: bytes) -> None:
    """Write the result to ``--out`` or standard output."""
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def load_p12(path: str, password_file: str | None) -> UnlockedKey:
    """Load a key pair and its chain from a PKCS#12 file."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise cli.UsageError(f"{path} is too large for a PKCS#12 file")
    password = cli.read_password(password_file, f"Password for {path}: ")
    try:
        key, certificate, others = pkcs12.load_key_and_certificates(data, password.encode("utf-8") or None)
    except ValueError:
        raise cli.UsageError(f"cannot open {path}: not PKCS#12, or a wrong password") from None
    if certificate is None or not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise cli.UsageError(f"{path} holds no RSA or EC key with its certificate")
    key_id = certificate.fingerprint(hashes.SHA256()).hex()[:16]
    return UnlockedKey(key_id=key_id, certificate=certificate, private_key=key, chain=tuple(others))


def _recipients(paths: list[str]) -> list[x509.Certificate]:
    found = []
    for name in paths:
        try:
            found.extend(load_certificates(Path(name)))
        except ConfigError as error:
            raise cli.UsageError(f"{name}: {error.message}") from None
    return found


def _validator(args: argparse.Namespace) -> TrustValidator:
    if args.ca:
        anchors = []
        for name in args.ca:
            try:
                anchors.extend(load_certificates(Path(name)))
            except ConfigError as error:
                raise cli.UsageError(f"{name}: {error.message}") from None
        return TrustValidator(anchors)
    try:
        config = cli.load(args)
    except ConfigError:
        return TrustValidator([])  # nothing trusted: every result says so
    return validator_from_config(config.trust)


def sender_of(message: bytes) -> str | None:
    """The address in the message's From header, if there is one."""
    head = smime.canonicalize(message[: smime.MAX_HEADER_BYTES]).split(b"\r\n\r\n", 1)[0]
    for line in head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"from":
            address = email.utils.parseaddr(value.decode("utf-8", "replace"))[1]
            return address or None
    return None
