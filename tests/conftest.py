"""Shared pytest configuration: the Hypothesis profiles.

``ci`` (selected when the environment variable CI is set, as on CI): ``deadline=None`` and
``derandomize=True``, so a CI run is reproducible and never fails on timing.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
