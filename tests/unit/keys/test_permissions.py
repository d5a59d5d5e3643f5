"""Who may manage which keys, and that a non-admin's key can only ever mint keys as weak as itself."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.auth.key_info import ApiKeyInfo, address_allowed
from runtime.keys import migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.permissions import Caller, NotAllowed
from runtime.keys.store import KeyStore

NOW = dt.datetime(2027, 3, 1, 12, 0, tzinfo=dt.UTC)
CALLER_EXPIRY = NOW + dt.timedelta(days=30)


def manager(**limits) -> Caller:
    """A non-admin with `keys:manage` and two other scopes, limited as given."""
    return Caller(
        user_id="alice", scopes=("keys:manage", "mlflow:read", "mlflow:write"), key_id="k1", **limits
    )


ADMIN = Caller(user_id="root", scopes=("keys:admin",), key_id="k0")


def create(caller: Caller, *, scopes=("mlflow:read",), expires_at=None, rate=None, ips=None):
    return caller.bounded(scopes=scopes, expires_at=expires_at, rate_limit_per_hour=rate, allowed_ips=ips)


# --- require_manage / owner_filter ----------------------------------------------------------------
@pytest.mark.parametrize("scopes", [("keys:manage",), ("keys:admin",), ("mlflow:read", "keys:manage")])
def test_managing_keys_needs_the_manage_or_admin_scope(scopes):
    Caller(user_id="alice", scopes=scopes).require_manage()  # does not raise


@pytest.mark.parametrize("scopes", [(), ("mlflow:read", "mlflow:write"), ("keys:manager",), ("KEYS:MANAGE",)])
def test_without_either_scope_managing_keys_is_refused(scopes):
    with pytest.raises(NotAllowed, match="keys:manage"):
        Caller(user_id="alice", scopes=scopes).require_manage()


def test_an_admin_may_touch_anyones_keys():
    assert ADMIN.owner_filter(None) is None  # every user's
    assert ADMIN.owner_filter("bob") == "bob"
    assert ADMIN.owner_filter("root") == "root"


def test_a_non_admin_touches_only_their_own_keys():
    caller = manager()
    assert caller.owner_filter(None) == "alice"
    assert caller.owner_filter("alice") == "alice"
    with pytest.raises(NotAllowed, match="another user"):
        caller.owner_filter("bob")
    with pytest.raises(NotAllowed):
        caller.owner_filter("")  # not "nobody, so everyone"


def test_the_audit_names_the_user_and_the_key():
    assert manager().actor == "api:alice key:k1"
    assert Caller(user_id="service:worker", scopes=("keys:manage",)).actor == "api:service:worker"


# --- scopes -------------------------------------------------------------------------------------
def test_a_non_admin_may_give_a_new_key_some_of_its_own_scopes():
    create(manager(), scopes=())
    create(manager(), scopes=("mlflow:read",))
    create(manager(), scopes=("mlflow:read", "mlflow:write", "keys:manage"))


@pytest.mark.parametrize(
    ("scopes", "named"),
    [
        (("keys:admin",), "keys:admin"),
        (("mlflow:read", "mlflow:admin"), "mlflow:admin"),
        (("x", "y"), "x, y"),
    ],
)
def test_a_non_admin_cannot_give_a_scope_it_lacks(scopes, named):
    with pytest.raises(NotAllowed, match=named):
        create(manager(), scopes=scopes)


# --- expiry ----------------------------------------------------------------------------------------
def test_a_new_key_inherits_the_callers_expiry_when_none_is_asked_for():
    expires, _, _ = create(manager(expires_at=CALLER_EXPIRY))
    assert expires == CALLER_EXPIRY


def test_a_new_key_may_expire_sooner_or_at_the_same_time_but_not_later():
    sooner = CALLER_EXPIRY - dt.timedelta(days=1)
    assert create(manager(expires_at=CALLER_EXPIRY), expires_at=sooner)[0] == sooner
    assert create(manager(expires_at=CALLER_EXPIRY), expires_at=CALLER_EXPIRY)[0] == CALLER_EXPIRY
    with pytest.raises(NotAllowed, match="outlive"):
        create(manager(expires_at=CALLER_EXPIRY), expires_at=CALLER_EXPIRY + dt.timedelta(seconds=1))


def test_a_rotation_into_a_key_without_expiry_is_refused_to_an_expiring_caller():
    with pytest.raises(NotAllowed, match="outlive"):
        manager(expires_at=CALLER_EXPIRY).check_covers(
            scopes=("mlflow:read",), expires_at=None, rate_limit_per_hour=None, allowed_ips=None
        )


def test_a_caller_without_expiry_may_create_keys_with_or_without_one():
    assert create(manager())[0] is None
    assert create(manager(), expires_at=NOW + dt.timedelta(days=3650))[0] == NOW + dt.timedelta(days=3650)


# --- rate limit -------------------------------------------------------------------------------------
def test_a_new_key_inherits_the_callers_rate_limit_and_may_not_exceed_it():
    assert create(manager(rate_limit_per_hour=100))[1] == 100
    assert create(manager(rate_limit_per_hour=100), rate=100)[1] == 100
    assert create(manager(rate_limit_per_hour=100), rate=0)[1] == 0
    with pytest.raises(NotAllowed, match="100 per hour"):
        create(manager(rate_limit_per_hour=100), rate=101)


def test_an_unlimited_key_cannot_come_from_a_limited_caller():
    with pytest.raises(NotAllowed, match="rate limit"):
        manager(rate_limit_per_hour=100).check_covers(
            scopes=(), expires_at=None, rate_limit_per_hour=None, allowed_ips=None
        )


def test_a_zero_rate_limit_is_a_limit_not_unlimited():
    assert create(manager(rate_limit_per_hour=0))[1] == 0
    with pytest.raises(NotAllowed):
        create(manager(rate_limit_per_hour=0), rate=1)


def test_an_unlimited_caller_may_set_any_rate_limit_or_none():
    assert create(manager())[1] is None
    assert create(manager(), rate=10**9)[1] == 10**9


# --- addresses --------------------------------------------------------------------------------------
def test_a_new_key_inherits_the_callers_allowlist():
    _, _, networks = create(manager(allowed_ips=("10.0.0.0/8", "2001:db8::/32")))
    assert networks == ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize(
    "inside",
    [["10.0.0.0/8"], ["10.1.0.0/16", "10.2.3.4"], ["10.255.255.255/32"], ["2001:db8:1::/48"], []],
)
def test_a_new_key_may_be_limited_to_part_of_the_callers_addresses(inside):
    caller = manager(allowed_ips=("10.0.0.0/8", "2001:db8::/32"))
    assert create(caller, ips=inside)[2] == inside


@pytest.mark.parametrize(
    "outside",
    [
        ["11.0.0.1"],
        ["10.0.0.0/7"],  # wider than the caller's /8
        ["0.0.0.0/0"],
        ["10.1.0.0/16", "192.168.0.1"],  # one entry outside is enough
        ["2001:db9::/32"],
        ["::/0"],
        ["::ffff:10.0.0.1/128"],  # IPv4-mapped IPv6 is another network, not 10.0.0.1
    ],
)
def test_addresses_outside_the_callers_allowlist_are_refused(outside):
    caller = manager(allowed_ips=("10.0.0.0/8", "2001:db8::/32"))
    with pytest.raises(NotAllowed, match="outside"):
        create(caller, ips=outside)


def test_an_ipv4_allowlist_does_not_cover_ipv6_and_back():
    with pytest.raises(NotAllowed, match="outside"):
        create(manager(allowed_ips=("0.0.0.0/0",)), ips=["2001:db8::1"])
    with pytest.raises(NotAllowed, match="outside"):
        create(manager(allowed_ips=("::/0",)), ips=["10.0.0.1"])


def test_a_limited_caller_cannot_rotate_into_a_key_usable_from_anywhere():
    with pytest.raises(NotAllowed, match="allowed addresses"):
        manager(allowed_ips=("10.0.0.0/8",)).check_covers(
            scopes=(), expires_at=None, rate_limit_per_hour=None, allowed_ips=None
        )


def test_an_unrestricted_caller_may_set_any_allowlist_or_none():
    assert create(manager())[2] is None
    assert create(manager(), ips=["0.0.0.0/0", "::/0"])[2] == ["0.0.0.0/0", "::/0"]


def test_every_limit_is_checked_not_only_the_first():
    caller = manager(expires_at=CALLER_EXPIRY, rate_limit_per_hour=10, allowed_ips=("10.0.0.0/8",))
    good = {
        "scopes": ("mlflow:read",),
        "expires_at": NOW,
        "rate_limit_per_hour": 5,
        "allowed_ips": ["10.0.0.1"],
    }
    caller.check_covers(**good)
    for field, wider in [
        ("scopes", ("keys:admin",)),
        ("expires_at", CALLER_EXPIRY + dt.timedelta(days=1)),
        ("rate_limit_per_hour", 11),
        ("allowed_ips", ["11.0.0.1"]),
    ]:
        with pytest.raises(NotAllowed):
            caller.check_covers(**{**good, field: wider})


# --- admins --------------------------------------------------------------------------------------------
def test_an_admin_is_unrestricted_and_its_own_limits_are_not_inherited():
    admin = Caller(
        user_id="root",
        scopes=("keys:admin",),
        expires_at=CALLER_EXPIRY,
        rate_limit_per_hour=1,
        allowed_ips=("10.0.0.0/8",),
    )
    assert create(admin, scopes=("anything", "keys:admin")) == (None, None, None)
    far = CALLER_EXPIRY + dt.timedelta(days=999)
    assert create(admin, expires_at=far, rate=10**6, ips=["0.0.0.0/0"]) == (far, 10**6, ["0.0.0.0/0"])
    admin.check_covers(scopes=("x",), expires_at=None, rate_limit_per_hour=None, allowed_ips=None)


# --- properties: what a non-admin mints is never wider than its own key ------------------------------------
SCOPES = ["keys:manage", "keys:admin", "mlflow:read", "mlflow:write", "mlflow:admin", "a", "b"]
V4_NETWORKS = st.builds(
    lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
    st.ip_addresses(v=4),
    st.integers(min_value=0, max_value=32),
)
V6_NETWORKS = st.builds(
    lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
    st.ip_addresses(v=6),
    st.integers(min_value=0, max_value=128),
)
NETWORKS = st.one_of(V4_NETWORKS, V6_NETWORKS)


@given(
    mine=st.sets(st.sampled_from(SCOPES)).filter(lambda s: "keys:admin" not in s),
    asked=st.sets(st.sampled_from(SCOPES)),
)
def test_scopes_are_allowed_exactly_when_the_caller_holds_them_all(mine, asked):
    caller = Caller(user_id="alice", scopes=tuple(mine))
    try:
        create(caller, scopes=tuple(asked))
    except NotAllowed:
        assert not asked <= mine
    else:
        assert asked <= mine


def _range(network: str) -> tuple[int, int, int]:
    """(version, first, last) address as integers, computed from the prefix arithmetic."""
    address, _, prefix = network.partition("/")
    parsed = ipaddress.ip_address(address)
    bits = 32 if parsed.version == 4 else 128
    size = 1 << (bits - int(prefix))
    first = int(parsed) - int(parsed) % size
    return parsed.version, first, first + size - 1


def _address(version: int, number: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(number) if version == 4 else ipaddress.IPv6Address(number)


def _subnet_of(draw, network: str) -> str:
    """A random network inside `network` (itself included)."""
    version, first, last = _range(network)
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(min_value=int(network.partition("/")[2]), max_value=bits))
    address = _address(version, draw(st.integers(min_value=first, max_value=last)))
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@st.composite
def allowlists(draw):
    """(the caller's networks, a requested allowlist: some entries inside them, some anywhere)."""
    mine = draw(st.lists(NETWORKS, min_size=1, max_size=4))
    asked = []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if draw(st.booleans()):
            asked.append(_subnet_of(draw, draw(st.sampled_from(mine))))
        else:
            asked.append(draw(NETWORKS))
    return mine, asked


@given(allowlists())
def test_a_covered_allowlist_lies_inside_one_of_the_callers_networks(lists):
    mine, asked = lists
    inside_one = all(
        any(
            v == own_v and own_first <= first and last <= own_last
            for own_v, own_first, own_last in map(_range, mine)
        )
        for v, first, last in map(_range, asked)
    )
    try:
        _, _, networks = create(manager(allowed_ips=tuple(mine)), ips=asked)
    except NotAllowed:
        assert not inside_one
    else:
        assert inside_one and networks == asked


@given(lists=allowlists(), client=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), data=st.data())
def test_an_address_a_covered_key_admits_is_admitted_by_the_callers_key(lists, client, data):
    """Judged by the middleware's own check (`address_allowed`), not by the code under test."""
    mine, asked = lists
    try:
        _, _, networks = create(manager(allowed_ips=tuple(mine)), ips=asked)
    except NotAllowed:
        return
    new_key = ApiKeyInfo("new", "alice", None, (), None, None, True, tuple(networks))
    callers_key = ApiKeyInfo("k1", "alice", None, (), None, None, True, tuple(mine))
    # an address the new key admits for sure (inside one of its networks), and a random one
    version, first, last = _range(networks[0])
    chosen = _address(version, data.draw(st.integers(min_value=first, max_value=last)))
    for address in (str(chosen), str(client)):
        if address_allowed(new_key, address):
            assert address_allowed(callers_key, address)


@given(
    expiry=st.one_of(st.none(), st.integers(min_value=-100, max_value=100)),
    rate=st.one_of(st.none(), st.integers(min_value=0, max_value=200)),
    asked_expiry=st.one_of(st.none(), st.integers(min_value=-100, max_value=100)),
    asked_rate=st.one_of(st.none(), st.integers(min_value=0, max_value=200)),
)
def test_a_created_key_never_outlives_or_outpaces_its_caller(expiry, rate, asked_expiry, asked_rate):
    own_expiry = None if expiry is None else NOW + dt.timedelta(days=expiry)
    caller = manager(expires_at=own_expiry, rate_limit_per_hour=rate)
    wanted_expiry = None if asked_expiry is None else NOW + dt.timedelta(days=asked_expiry)
    try:
        expires, limit, _ = create(caller, expires_at=wanted_expiry, rate=asked_rate)
    except NotAllowed:
        too_late = own_expiry is not None and wanted_expiry is not None and wanted_expiry > own_expiry
        too_fast = rate is not None and asked_rate is not None and asked_rate > rate
        assert too_late or too_fast
        return
    if own_expiry is not None:
        assert expires is not None and expires <= own_expiry
    if rate is not None:
        assert limit is not None and limit <= rate
    assert expires == (wanted_expiry if wanted_expiry is not None else own_expiry)
    assert limit == (asked_rate if asked_rate is not None else rate)


# --- the per-user key count (KeyStore.active_key_count) ---------------------------------------------------
def test_active_key_count_counts_a_users_active_keys_only(tmp_path):
    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    migrate.upgrade(engine)
    store = KeyStore(engine, KeyHasher(b"s" * 32), environment="staging")
    assert store.active_key_count("alice") == 0
    first = store.create("alice", "one", actor="t")
    store.create("alice", "two", actor="t")
    store.create("bob", "other", actor="t")
    assert store.active_key_count("alice") == 2
    store.revoke(first.record.id, actor="t")
    assert store.active_key_count("alice") == 1
    store.rotate(store.list_keys(owner="alice")[0].id, actor="t", grace=dt.timedelta(0))
    assert store.active_key_count("alice") == 1  # the old one ended, the new one counts
    store.rotate(store.list_keys(owner="alice")[0].id, actor="t")
    assert store.active_key_count("alice") == 2  # during the grace period both are active
    assert store.active_key_count("bob") == 1
    assert store.active_key_count("carol") == 0
