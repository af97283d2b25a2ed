"""Model files you can trust (issue 4): manifests, parallel incremental verification, ranged
resumable downloads with per-file repair. See docs/store.md.

The swap preflight is `sparkd.store.preflight.preflight_verify(config, model)`.
"""
