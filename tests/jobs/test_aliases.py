"""The alias stores: the file beside models/ACTIVE and the Redis hash beside the pointer key, both
compare-and-set, production's model being the active pointer itself; the routing hash is stable."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.aliases import RedisAliases
from jobs.pointer import RedisPointer
from jobs.redis_client import connect_redis
from lm.aliases import PRODUCTION, AliasStore, Canary, FileAliases, change_alias, delete_alias, key_fraction, set_alias
from lm.errors import AliasNotFound, PromotionConflict
from lm.registry import FilePointer
from tests.redis_server import RedisServer


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> Iterator[AliasStore]:
    if request.param == "file":
        FilePointer(tmp_path).compare_and_set(None, "model-a")
        yield FileAliases(tmp_path)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = connect_redis(server.url)
    pointer = RedisPointer(client, prefix=prefix)
    assert pointer.compare_and_set(None, "model-a")
    yield RedisAliases(client, pointer, prefix=prefix)
    client.close()


def test_production_is_the_active_pointer_and_aliases_are_compare_and_set(store: AliasStore) -> None:
    [production] = store.all().values()
    assert (production.name, production.model, production.canary) == (PRODUCTION, "model-a", None)

    set_alias(store, PRODUCTION, "model-a", Canary("model-b", 0.1), expected_model="model-a")
    assert store.all()[PRODUCTION].canary == Canary("model-b", 0.1)
    with pytest.raises(PromotionConflict):
        set_alias(store, PRODUCTION, "model-c", None, expected_model="model-b")

    stale = store.all()[PRODUCTION]
    promoted = change_alias(store, PRODUCTION, "promote")
    assert (promoted.model, promoted.canary) == ("model-b", None)
    assert store.all()[PRODUCTION].model == "model-b"  # the pointer moved
    assert not store.compare_and_set(stale, stale)  # a write based on an old read loses
    with pytest.raises(PromotionConflict, match="no canary"):
        change_alias(store, PRODUCTION, "abort")

    set_alias(store, "stable", "model-a", None, expected_model=None)
    with pytest.raises(PromotionConflict):
        set_alias(store, "stable", "model-b", None, expected_model=None)  # exists already
    delete_alias(store, "stable")
    with pytest.raises(AliasNotFound):
        delete_alias(store, "stable")
    with pytest.raises(PromotionConflict):
        delete_alias(store, PRODUCTION)


def test_concurrent_compare_and_sets_let_exactly_one_win(store: AliasStore) -> None:
    set_alias(store, "stable", "model-a", None)

    def attempt(i: int) -> bool:
        try:
            set_alias(store, "stable", f"model-{i}", None, expected_model="model-a")
            return True
        except PromotionConflict:
            return False

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(attempt, range(1, 17)))
    assert wins.count(True) == 1
    assert store.all()["stable"].model == f"model-{wins.index(True) + 1}"


def test_a_change_is_noticed_on_the_aliases_channel(redis_server: RedisServer, prefix: str) -> None:
    client = connect_redis(redis_server.url)
    pointer = RedisPointer(client, prefix=prefix)
    store = RedisAliases(client, pointer, prefix=prefix)
    notices = client.pubsub()
    notices.subscribe(store.channel, pointer.channel)
    for _ in range(2):
        notices.get_message(timeout=1.0)  # the subscribe confirmations

    set_alias(store, "stable", "model-a", None)
    set_alias(store, PRODUCTION, "model-b", Canary("model-a", 0.5))
    received = []
    while (message := notices.get_message(timeout=0.5)) is not None:
        if message["type"] == "message":
            received.append((message["channel"], message["data"]))
    assert received == [(store.channel, "stable"), (pointer.channel, "model-b"), (store.channel, PRODUCTION)]
    notices.close()
    client.close()


def test_the_routing_hash_is_stable() -> None:
    # every replica, and every textgen version, maps a key to the same number (BLAKE2b of "alias\nkey"):
    # a change here would move users between versions
    assert key_fraction("user-42", PRODUCTION) == 0.41215761991114913
    assert key_fraction("user-42", "stable") == 0.5662326774087998
    assert 0 <= key_fraction("", "x") < 1
