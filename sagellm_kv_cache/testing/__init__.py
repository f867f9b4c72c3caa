"""Helpers for tests and benchmarks of ``sagellm_kv_cache`` (not used by the library).

* ``launcher``: start N local ranks on 127.0.0.1 (a gloo group and a shared
  store) and always end them;
* ``faults``: a wrapping transfer backend that corrupts, stalls or kills at
  named stages of a transfer.
"""
