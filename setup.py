"""Packaging for phx_gevent: Phoenix Channels for Flask on gevent."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="phx_gevent",
    version="0.1.0",
    description="Phoenix Channels for Flask on gevent: the official phoenix.js client, unchanged.",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["phx_gevent", "phx_gevent.*"]),
    # PEP 561 (the public API is typed), and the dashboard's page.
    package_data={"phx_gevent": ["py.typed", "static/*.html"]},
    python_requires=">=3.11",
    install_requires=[
        "gevent>=24.10.1",
        "gevent-websocket>=0.10.1",
        "Flask>=3.0",
        "itsdangerous>=2.1",
        "ujson>=5.8",
        "blinker>=1.7",
    ],
    extras_require={
        "redis": ["redis>=5.0"],
        # gunicorn's gevent worker (our worker's base) needs gunicorn's own
        # "gevent" extra (it imports `packaging`).
        "gunicorn": ["gunicorn[gevent]>=23.0"],
        "client": ["websocket-client>=1.6"],
        "metrics": ["prometheus_client>=0.17"],
    },
    classifiers=[
        "Framework :: Flask",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP :: WSGI :: Server",
    ],
)
