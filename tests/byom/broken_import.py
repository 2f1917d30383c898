"""A model module whose own import fails (a dependency that is not installed)."""

import not_an_installed_dependency  # noqa: F401


def build(config, checkpoint=None):
    raise AssertionError("never reached")
