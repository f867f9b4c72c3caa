"""Direct-mode message planning: the message size rule and the message count."""

from __future__ import annotations

from sagellm_kv_cache.transfer.plan import (
    DIRECT_MAX_MESSAGE_BYTES,
    message_cap,
    num_direct_messages,
    runs_of,
)

MiB = 1 << 20


def test_message_cap_setting_then_backend_then_default():
    assert message_cap(None, None, cuda=False) == DIRECT_MAX_MESSAGE_BYTES == 16 * MiB
    assert message_cap(None, 2 * MiB, cuda=False) == 2 * MiB  # gloo's preference
    assert message_cap(None, 2 * MiB, cuda=True) == 16 * MiB  # host preference only
    assert message_cap(128, 2 * MiB, cuda=False) == 128  # the engine's setting wins
    assert message_cap(128, None, cuda=True) == 128


def test_runs_and_message_count():
    # src 0,1,2 -> dst 5,6,7 is one run; src 9 -> dst 3 another
    assert runs_of([0, 1, 2, 9], [5, 6, 7, 3]) == [(0, 5, 3), (9, 3, 1)]
    runs = runs_of([0, 1, 2, 9], [5, 6, 7, 3])
    # per layer and K/V: the 3-block run in ceil(3 / 2) = 2 messages, the 1-block run in 1
    assert num_direct_messages(runs, num_layers=4, per_message=2) == (2 + 1) * 2 * 4
    assert num_direct_messages(runs, num_layers=4, per_message=8) == (1 + 1) * 2 * 4
