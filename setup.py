"""Packaging for Gatekeeper, the S/MIME e-mail encryption gateway."""

from setuptools import find_packages, setup

setup(
    name="gatekeeper",
    version="0.1.0",
    description="An automated S/MIME e-mail encryption gateway (SMTP, POP3 and IMAP4 proxies) on Twisted",
    long_description=open("README.rst", encoding="utf-8").read(),
    python_requires=">=3.11",
    packages=find_packages(include=["gatekeeper", "gatekeeper.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/gatekeeper_plugin.py"]},
    install_requires=[
        "twisted[tls,conch]>=24.7",
        "pyopenssl>=24.0",
        "service-identity>=24.1",
        "cryptography>=44",
        "pyasn1>=0.6",
        "pyasn1-modules>=0.4",
        "ldap3>=2.9",
        "attrs>=23.1",
        "idna>=3.6",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.100",
            "ruff>=0.6",
            "mypy>=1.11",
            "mypy-zope>=1.0",
            "types-pyOpenSSL",
            "playwright>=1.40",  # drives Debian's /usr/bin/chromium; downloads no browser
        ],
    },
    entry_points={"console_scripts": ["gatekeeper = gatekeeper.admin.cli:main"]},
)
