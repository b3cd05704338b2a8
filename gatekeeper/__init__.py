"""Gatekeeper: an automated S/MIME e-mail encryption gateway on Twisted.

Mail clients talk SMTP, POP3 and IMAP4 to Gatekeeper; Gatekeeper signs and encrypts
what they send and decrypts and verifies what they fetch, with private keys that only
their users' passwords unlock.
"""

__version__ = "0.1.0"
