"""Developer tasks: ``nox -s tests`` (the default), lint, typecheck, examples, docs, chaos, bench."""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = [
    "pytest>=8",
    "pytest-trio>=0.8",
    "hypothesis>=6.100",
    # The auth scenarios make their own CA and certificates, and nkeys.
    "cryptography>=42",
    "nkeys>=0.2",
    # tests/test_otel.py reads natrio's spans and metrics with the SDK's in-memory exporters.
    "opentelemetry-sdk>=1.30",
]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against real nats-server processes."""
    # With the otel extra, so that its tests run (one of them checks natrio runs without it).
    session.install(".[otel]", *TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (with the ASYNC rules) and the formatter's check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and the examples."""
    session.install(".[bench,otel]", "mypy>=1.10", "nox", *TEST_DEPS)
    session.run("mypy")


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example script; each starts an embedded server when no NATS is reachable."""
    session.install(".")
    for script in sorted(glob.glob("examples/*.py")):
        session.run("python", script, env={"NATRIO_URL": "nats://127.0.0.1:1"})


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs with warnings as errors."""
    # With the otel extra: the API reference documents natrio.otel.
    session.install(".[otel]", "-r", "docs/requirements.txt")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def chaos(session: nox.Session) -> None:
    """The full chaos suite; writes its figures to docs/reliability.md."""
    session.install(".", *TEST_DEPS)
    results = "chaos-results.jsonl"
    session.run("rm", "-f", results, external=True)
    env = {"NATRIO_CHAOS_SCALE": "full", "NATRIO_CHAOS_RESULTS": results}
    session.run("pytest", "tests/chaos", "-s", *session.posargs, env=env)
    session.run(
        "python", "-m", "tests.chaos.render", results, "docs/reliability.md", "nox -s chaos"
    )


@nox.session
def bench(session: nox.Session) -> None:
    """``natrio bench``, natrio beside plain nats-py workers; arguments after ``--`` go to it.

    ``nox -s bench`` is the full run (minutes); ``nox -s bench -- --quick`` a small one.
    """
    session.install(".[bench]")
    session.run("natrio", "bench", *session.posargs)
