"""Test-wide settings: CPU, float32 matmuls at full precision (parity tests compare to torch)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import x2sam_jax  # noqa: E402,F401  (sets the flax config the models rely on)


def pytest_terminal_summary(terminalreporter):
    """Files a test saved for people to look at (``record_property("artefact", path)``, e.g. the
    web demo's screenshots), listed at the end of the run; under xdist too (the properties travel
    with the reports; each phase's report carries them, hence the dict)."""
    paths = dict.fromkeys(value for reports in terminalreporter.stats.values() for report in reports
                          for name, value in getattr(report, "user_properties", ()) if name == "artefact")
    if paths:
        terminalreporter.section("artefacts")
        for path in paths:
            terminalreporter.write_line(str(path))
