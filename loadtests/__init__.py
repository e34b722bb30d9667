"""Load tests (locust) and the helpers they share with the overload / isolation tests.

    python -m loadtests.run --users 16 --duration 60s --max-error-ratio 0.01 --max-p99-ms 2000

See loadtests/README.md.
"""
