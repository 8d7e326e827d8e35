"""Settings shared by every test."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Hypothesis examples that shell out to Nix are slow by nature; no deadline.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# SeaweedFS with no identities accepts any credentials, but boto3 must have some
# to sign requests.  They are test-only values.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "nix-cache-uploader-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "nix-cache-uploader-test")
os.environ.pop("AWS_PROFILE", None)
