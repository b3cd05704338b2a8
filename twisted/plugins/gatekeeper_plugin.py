"""The twistd plugin: ``twistd -n gatekeeper --config etc/gatekeeper.toml``.

Names ``gatekeeper.tap`` as a string so that listing plugins imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

gatekeeper = ServiceMaker(
    "Gatekeeper",
    "gatekeeper.tap",
    "S/MIME encryption gateway: SMTP, POP3 and IMAP4 proxies",
    "gatekeeper",
)
