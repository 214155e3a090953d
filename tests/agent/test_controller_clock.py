"""The agent's view of the controller's clock (agent.core) and its control-plane trust (agent.trust)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent import core, trust
from agent.config import AgentSettings
from agent.store import Store
from agent.trust import ControllerKey, controller_key_path
from certs import init_pki, load_control_key
from fleet.protocol.codec import decode_raw, encode
from fleet.protocol.errors import ConfigError, InvalidSignature
from fleet.protocol.messages import Command, DesiredState
from fleet.protocol.signing import sign_control

HOUR = 3600.0

# ---- agent.core: pure decisions -----------------------------------------------------------------


def test_the_first_sample_is_taken_as_it_is() -> None:
    clock = core.learn_controller_time(None, issued_at=1000.0, now=1000.0 + HOUR)  # we are an hour ahead
    assert clock == core.ControllerClock(-HOUR, 1000.0 + HOUR)
    assert core.controller_now(clock, 2000.0 + HOUR) == 2000.0
    assert core.controller_now(None, 5.0) == 5.0  # nothing learned: our own clock


def test_a_higher_sample_raises_the_estimate_a_lower_one_is_ignored() -> None:
    clock = core.learn_controller_time(None, 1000.0, 1010.0)  # arrived after 10 s: offset >= -10
    clock = core.learn_controller_time(clock, 2000.0, 2000.5)  # a fresh one: offset >= -0.5
    assert clock.offset == -0.5
    # A resend of an old command (issued 5 minutes ago) says offset >= -300: no news.
    later = core.learn_controller_time(clock, 2100.0, 2400.0)
    assert later == clock


def test_a_sample_just_below_confirms_the_estimate() -> None:
    clock = core.ControllerClock(-0.5, 2000.0)
    confirmed = core.learn_controller_time(clock, 2500.0 - 2.0, 2500.0)
    assert confirmed == core.ControllerClock(-0.5, 2500.0)


def test_an_estimate_not_confirmed_for_a_day_gives_way_to_the_latest_sample() -> None:
    # E.g. the controller's clock was an hour fast and was set right: its messages now say less.
    clock = core.ControllerClock(HOUR, 0.0)
    kept = core.learn_controller_time(clock, 1000.0, 1000.0)
    assert kept == clock
    trusted = core.learn_controller_time(clock, core.CLOCK_TRUST + 10.0, core.CLOCK_TRUST + 10.0)
    assert trusted == core.ControllerClock(0.0, core.CLOCK_TRUST + 10.0)


def test_a_step_of_our_clock_moves_the_offset_the_other_way() -> None:
    clock = core.ControllerClock(HOUR, 100.0)  # we were an hour behind
    stepped = core.clock_stepped(clock, HOUR)  # NTP set us forward by an hour
    assert stepped == core.ControllerClock(0.0, 100.0 + HOUR)


@pytest.mark.parametrize("skew", [-86_400.0, -HOUR, 0.0, HOUR, 86_400.0])
def test_expiry_is_judged_on_controller_time_whatever_our_clock(skew: float) -> None:
    issued = 1_764_000_000.0
    fresh = Command(id="c1", action="ping", expires_at=issued + 600, issued_at=issued)
    clock = core.learn_controller_time(None, issued, issued + 1.0 + skew)
    now = core.controller_now(clock, issued + 1.0 + skew)
    assert core.command_intake(fresh, earlier=None, now=now).execute
    later = core.controller_now(clock, issued + 700.0 + skew)
    intake = core.command_intake(fresh, earlier=None, now=later)
    assert (intake.outcome, intake.detail) == (core.Intake.EXPIRED, f"expired at {issued + 600:.0f}")


# ---- agent.trust: keys, refusals, the clock kept in agent.db -------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return init_pki(tmp_path_factory.mktemp("pki") / "pki")


def _settings(tmp_path: Path, ca: Path, **extra: Any) -> AgentSettings:
    tls = {"ca": ca, "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    return AgentSettings(node_id="gw-a", server_addr="127.0.0.1:8883", tls=tls, state_dir=tmp_path / "s", **extra)


def _command(pki: Any, node: str = "gw-a", action: str = "restart", **options: Any) -> dict[str, Any]:
    now = options.pop("issued_at", time.time())
    command = Command(id="c1", action=action, expires_at=now + 600)
    return decode_raw("t", encode(sign_control(command, node, load_control_key(pki), issued_at=now)))


def test_the_key_next_to_the_ca_is_the_default(pki: Any, tmp_path: Path) -> None:
    assert controller_key_path(_settings(tmp_path, pki.ca_cert)) == pki.control_pub
    explicit = tmp_path / "elsewhere.pub"
    assert controller_key_path(_settings(tmp_path, pki.ca_cert, controller_public_key=explicit)) == explicit
    assert controller_key_path(_settings(tmp_path, tmp_path / "ca.pem")) is None


def test_without_a_key_the_agent_refuses_to_start_unless_told(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no controller key: set controller_public_key .* or .*control\.pub"):
        ControllerKey.from_settings(_settings(tmp_path, tmp_path / "ca.pem"))
    insecure = ControllerKey.from_settings(_settings(tmp_path, tmp_path / "ca.pem", insecure_unsigned_control=True))
    assert not insecure.configured
    insecure.check_desired({"generation": 1})  # nothing is verified
    insecure.check_command({"id": "c", "action": "restart"}, frozenset())


def test_a_key_that_is_no_key_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "control.pub"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match=r"control\.pub: not a PEM public key"):
        ControllerKey(bad)


def test_commands_unsigned_allowed_signed_checked(pki: Any) -> None:
    key = ControllerKey(pki.control_pub, node="gw-a")
    allowed = frozenset({"ping", "report"})
    key.check_command({"id": "c", "action": "ping"}, allowed)
    with pytest.raises(InvalidSignature) as caught:
        key.check_command({"id": "c", "action": "restart"}, allowed)
    assert caught.value.reason == "unsigned command: restart needs a signature (allowed unsigned: ping, report)"
    with pytest.raises(InvalidSignature, match=r"allowed unsigned: none\)"):
        key.check_command({"id": "c", "action": "ping"}, frozenset())
    key.check_command(_command(pki), allowed)
    with pytest.raises(InvalidSignature, match="signed for node 'gw-b', not for 'gw-a'"):
        key.check_command(_command(pki, node="gw-b"), allowed)
    # A signed ping is checked like any signed command (the allow-list is for unsigned ones only).
    with pytest.raises(InvalidSignature, match="signed for node 'gw-b'"):
        key.check_command(_command(pki, node="gw-b", action="ping"), allowed)


def test_desired_state_must_be_signed_for_this_node(pki: Any) -> None:
    key = ControllerKey(pki.control_pub, node="gw-a")
    with pytest.raises(InvalidSignature, match="desired state is not signed"):
        key.check_desired({"generation": 1})
    signed = sign_control(DesiredState(generation=1), "gw-a", load_control_key(pki), issued_at=time.time())
    key.check_desired(decode_raw("t", encode(signed)))
    other = sign_control(DesiredState(generation=1), "gw-b", load_control_key(pki), issued_at=time.time())
    with pytest.raises(InvalidSignature, match="signed for node 'gw-b'"):
        key.check_desired(decode_raw("t", encode(other)))


def test_the_clock_is_learned_from_verified_messages_only_and_kept(pki: Any, tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    try:
        key = ControllerKey(pki.control_pub, node="gw-a", store=store)
        assert key.clock is None
        unsigned = {"id": "u", "action": "ping", "issued_at": time.time() + 10 * HOUR}
        key.check_command(unsigned, frozenset({"ping"}))
        assert key.clock is None  # an unsigned issued_at teaches nothing
        key.check_command(_command(pki, issued_at=time.time() + HOUR), frozenset())
        assert key.clock is not None
        assert key.clock.offset == pytest.approx(HOUR, abs=5)
        assert key.controller_now() == pytest.approx(time.time() + HOUR, abs=5)
        again = ControllerKey(pki.control_pub, node="gw-a", store=store)  # a restart
        assert again.clock is not None
        assert again.clock.offset == pytest.approx(HOUR, abs=5)
    finally:
        store.close()


def test_a_step_of_the_wall_clock_moves_the_learned_offset(
    pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall, steady = [1_000_000.0], [50.0]
    monkeypatch.setattr(trust.time, "time", lambda: wall[0])
    monkeypatch.setattr(trust.time, "clock_gettime", lambda _clock_id: steady[0])
    key = ControllerKey(pki.control_pub, node="gw-a")
    key.check_command(_command(pki, issued_at=wall[0] + HOUR), frozenset())  # we are an hour behind
    assert key.controller_now() == wall[0] + HOUR
    wall[0] += HOUR + 10.0  # NTP sets us right while 10 s pass
    steady[0] += 10.0
    assert key.controller_now() == pytest.approx(wall[0])
    assert key.clock is not None
    assert key.clock.offset == pytest.approx(0.0)
