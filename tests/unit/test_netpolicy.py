"""blocked-nets: what each setting blocks, before and after the server says whether the
agent is public, and how a bad value is refused."""
from __future__ import annotations

import pytest

from taskd.agent.builtin.netpolicy import BlockedAddress, NetPolicy, parse_blocked_nets
from taskd.agent.settings import load_agent_settings
from taskd.config import ConfigError

INSIDE = ["127.0.0.1", "10.1.2.3", "172.31.255.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
          "0.0.0.0", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
          "64:ff9b::a00:1", "224.0.0.251", "198.18.0.1", "255.255.255.255"]
OUTSIDE = ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:db8::1", "192.0.2.10", "64:ff9b::808:808"]


def told(setting: str, public: bool | None) -> NetPolicy:
    policy = NetPolicy(setting)
    if public is not None:
        policy.server_said({"x-taskd-agent-public": "true" if public else "false"})
    return policy


@pytest.mark.parametrize("public", [True, None], ids=["public", "not-said-yet"])
def test_auto_blocks_the_default_networks_on_a_public_agent(public):
    policy = told("auto", public)
    assert [a for a in INSIDE if policy.blocked_by(a) is None] == []
    assert [a for a in OUTSIDE if policy.blocked_by(a) is not None] == []
    assert policy.blocked_by("169.254.169.254") == "169.254.0.0/16, link-local, cloud metadata"
    with pytest.raises(BlockedAddress, match=r"^10\.0\.0\.1 is blocked by blocked-nets \(10\.0\.0\.0/8, RFC 1918"):
        policy.check("10.0.0.1")


def test_auto_blocks_nothing_on_a_private_agent():
    policy = told("auto", False)
    assert not policy.active and all(policy.blocked_by(a) is None for a in INSIDE)
    policy.server_said({"x-taskd-agent-public": "true"})  # made public: reconnects, is told
    assert policy.active


@pytest.mark.parametrize("public", [True, False])
def test_an_explicit_list_and_none_ignore_the_flag(public):
    explicit = told("192.0.2.0/24,fd00::/8", public)
    assert explicit.blocked_by("192.0.2.10") == "192.0.2.0/24, blocked-nets"
    assert explicit.blocked_by("fd12::1") == "fd00::/8, blocked-nets"
    assert explicit.blocked_by("127.0.0.1") is None
    assert not told("none", public).active


@pytest.mark.parametrize("text, normal", [
    ("auto", "auto"), (" AUTO ", "auto"), ("none", "none"), ("", "none"),
    ("10.0.0.1/8, ::1", "10.0.0.0/8,::1/128"),
])
def test_parse(text, normal):
    assert parse_blocked_nets(text) == normal


def test_a_bad_entry_is_a_start_up_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_agent_settings(str(tmp_path / "absent.ini"), env={"TASKAGENT_BLOCKED_NETS": "10.0.0.0/8,intranet"})
    assert "blocked-nets" in str(err.value) and "'intranet' is not a network" in str(err.value)
