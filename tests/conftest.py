from hypothesis import HealthCheck, settings

# Laws are checked on hundreds of examples; no per-example deadline on a shared 2-core box.
settings.register_profile(
    "default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("default")
