"""Packaging for mailoutbox."""
import os

from setuptools import find_packages
from setuptools import setup


def read(*names):
    here = os.path.dirname(__file__)
    with open(os.path.join(here, *names), encoding="utf-8") as f:
        return f.read()


TESTS_REQUIRE = [
    "pytest >= 7",
    "pytest-cov",
    "coverage[toml] >= 7",
    "hypothesis",
    "aiosmtpd >= 1.4",
    "cryptography",
    "zope.sendmail >= 7.3",
    "zope.security",
    "ZODB",
    "SQLAlchemy >= 2",
    "zope.sqlalchemy",
    "pyramid >= 2",
    "pyramid_tm",
    "pyramid_zcml",
    "WebTest",
    "ruff",
    "prometheus_client >= 0.17",
    "psycopg[binary] >= 3.1",
]

setup(
    name="mailoutbox",
    version="0.1.0.dev0",
    description=(
        "Transaction-aware mail delivery with a durable Maildir queue for"
        " the Zope component architecture, Pyramid and plain Python."
    ),
    long_description=read("README.rst") + "\n\n" + read("CHANGES.rst"),
    long_description_content_type="text/x-rst",
    author="The mailoutbox developers",
    license="ZPL-2.1",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Framework :: Zope :: 3",
        "Framework :: Pyramid",
        "Intended Audience :: Developers",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Communications :: Email",
    ],
    keywords="mail smtp maildir queue transaction zope pyramid",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={"mailoutbox": ["*.zcml", "py.typed"]},
    zip_safe=False,
    python_requires=">=3.10",
    install_requires=[
        "setuptools",
        "zope.interface >= 5",
        "zope.component >= 5",
        "zope.event >= 4",
        "zope.schema >= 6",
        "zope.configuration >= 5",
        "transaction >= 3",
    ],
    extras_require={
        "test": TESTS_REQUIRE,
        "docs": [
            "Sphinx >= 7",
            "repoze.sphinx.autointerface",
        ],
        "server": ["aiosmtpd >= 1.4"],
        "metrics": ["prometheus_client >= 0.17"],
        "postgresql": ["psycopg[binary] >= 3.1"],
    },
    entry_points={
        "console_scripts": [
            "mailoutbox = mailoutbox.cli:main",
        ],
        "pytest11": [
            "mailoutbox = mailoutbox.testing.pytest_plugin",
        ],
    },
)
