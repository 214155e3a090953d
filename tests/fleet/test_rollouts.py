"""The rollout engine against a simulated fleet: real SQLite, real release store, a driven clock.

The fakes are the world the engine observes (node views the test changes, desired state and
commands recorded in lists), not mocks of the engine. ``Sim`` plays the agents: a node whose
desired release differs from its version updates after ``update_delay`` and then sends health
messages, unless the test makes it offline, bad (reports failed) or silent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import certs
from fleet.controller import rollouts
from fleet.controller.facade import (
    BadRequest,
    Conflict,
    NodeOutcome,
    NodeStatus,
    NodeView,
    NotFound,
    RolloutRequest,
    RolloutState,
    RolloutView,
)
from fleet.controller.rollouts import AbortCriteria, RolloutEngine, parse_waves
from fleet.controller.storage import Database
from fleet.protocol.messages import ReleaseRef
from fleet.protocol.signing import load_private_key
from fleet.releases import ReleaseManifest, ReleaseStore, build_release
from tests.fakeclock import Clock

pytestmark = pytest.mark.timeout(60)

SOAK, HEALTH_TIMEOUT, WAVE_TIMEOUT = 10.0, 5.0, 60.0


# ---- the world --------------------------------------------------------------------------------


@dataclass
class Releases:
    store: ReleaseStore
    old: ReleaseManifest
    new: ReleaseManifest


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    root = tmp_path_factory.mktemp("rollout-releases")
    key = load_private_key(certs.init_pki(root / "pki").release_key.read_bytes())
    built = []
    for version in ("1.0.0", "2.0.0"):
        source = root / f"src-{version}"
        (source / "bin").mkdir(parents=True)
        (source / "bin" / "app").write_bytes(f"#!/bin/sh\necho {version}\n".encode())
        built.append(
            build_release(
                source,
                name="app",
                version=version,
                store=root / "store",
                release_key=key,
                entry=["bin/app"],
                health=None,
                chunk_size=64 * 1024,
            )
        )
    return Releases(ReleaseStore(root / "store"), built[0], built[1])


class FakeFleet:
    def __init__(self) -> None:
        self.views: dict[str, NodeView] = {}

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        wanted = (selector or {}).items()
        return [view for view in self.views.values() if all(view.labels.get(k) == v for k, v in wanted)]

    def node_view(self, node_id: str) -> NodeView:
        if node_id not in self.views:
            raise NotFound(node_id)
        return self.views[node_id]

    def update(self, node: str, **changes: Any) -> None:
        self.views[node] = self.views[node].model_copy(update=changes)


class FakeDesired:
    def __init__(self) -> None:
        self.current: dict[str, ReleaseRef | None] = {}
        self.published: list[tuple[str, ReleaseRef | None]] = []
        self.fail_after_publish: set[str] = set()  # "crash" right after this node's publish
        self.fail_before_publish: set[str] = set()  # "crash" before this node's publish
        self.broken: set[str] = set()  # every publish to this node fails (a poisoned generation)

    def publish_release(self, node: str, release: ReleaseRef | None) -> int:
        if node in self.broken:
            raise ValueError(f"generation of {node}: 9223372036854775808 is above 9223372036854775807")
        if node in self.fail_before_publish:
            self.fail_before_publish.discard(node)
            raise RuntimeError(f"simulated crash before publishing to {node}")
        self.current[node] = release
        self.published.append((node, release))
        if node in self.fail_after_publish:
            self.fail_after_publish.discard(node)
            raise RuntimeError(f"simulated crash after publishing to {node}")
        return len(self.published)

    def current_release(self, node: str) -> ReleaseRef | None:
        return self.current.get(node)

    def to(self, version: str) -> list[str]:
        return [node for node, ref in self.published if ref is not None and ref.version == version]


class FakeCommands:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any] | None, str | None]] = []
        self.fail: set[str] = set()  # "crash" before sending to this node
        self.broken: set[str] = set()  # every send to this node fails

    def send(
        self,
        node: str,
        action: str,
        args: dict[str, Any] | None = None,
        expires_in: float = 3600.0,
        rollout_id: str | None = None,
    ) -> object:
        if node in self.fail:
            self.fail.discard(node)
            raise RuntimeError(f"simulated crash before sending to {node}")
        if node in self.broken:
            raise RuntimeError(f"cannot send to {node}")
        self.sent.append((node, action, args, rollout_id))
        return len(self.sent)


@dataclass
class Sim:
    """The fleet plus agent behaviour; ``step`` advances time, lets agents act, then ticks."""

    releases: Releases
    db_path: Path
    clock: Clock = field(default_factory=Clock)
    fleet: FakeFleet = field(default_factory=FakeFleet)
    desired: FakeDesired = field(default_factory=FakeDesired)
    commands: FakeCommands = field(default_factory=FakeCommands)
    offline: set[str] = field(default_factory=set)
    bad: set[str] = field(default_factory=set)  # the update fails and the agent rolls back
    silent: set[str] = field(default_factory=set)  # updates, then never sends health again
    update_delay: float = 1.0
    seen_desired: dict[str, float] = field(default_factory=dict)
    engine: RolloutEngine = field(init=False)

    def __post_init__(self) -> None:
        self.db = Database(self.db_path)
        self.engine = self.new_engine()

    def new_engine(self) -> RolloutEngine:
        return RolloutEngine(self.db, self.fleet, self.desired, self.commands, self.releases.store, clock=self.clock)

    def restart(self) -> None:
        """A controller restart: a new connection and engine on the same file, the world unchanged."""
        self.db.close()
        self.db = Database(self.db_path)
        self.engine = self.new_engine()

    def add_nodes(
        self, count: int, version: str | None = "1.0.0", operator: dict[str, str] | None = None, **labels: str
    ) -> list[str]:
        """``labels`` as the nodes report them, ``operator`` as an operator set them on the controller."""
        start = len(self.fleet.views)
        ids = [f"gw-{start + index:03d}" for index in range(count)]
        reported = {"site": "plant-3", **labels}
        for node in ids:
            self.fleet.views[node] = NodeView(
                id=node,
                status=NodeStatus.ONLINE,
                version=version,
                update_state="healthy",
                healthy=True,
                labels=reported | (operator or {}),
                operator_labels=dict(operator or {}),
                reported_labels=reported,
                last_seen=self.clock.now,
                health_ts=self.clock.now,
                reported_ts=self.clock.now,
            )
            self.desired.current[node] = self.releases.old.ref()
        return ids

    def step(self, seconds: float = 0.5) -> None:
        self.clock.now += seconds
        for node in list(self.fleet.views):
            self._agent(node)
        self.engine.tick()

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / 0.5)):
            self.step()

    def run_until(self, done: Any, limit: float = 600.0) -> None:
        deadline = self.clock.now + limit
        while not done():
            assert self.clock.now < deadline, "simulation did not reach the expected state"
            self.step()

    def _agent(self, node: str) -> None:
        now = self.clock.now
        view = self.fleet.views[node]
        if node in self.offline:
            self.fleet.update(node, status=NodeStatus.OFFLINE)
            return
        self.fleet.update(node, status=NodeStatus.ONLINE, last_seen=now)
        wanted = self.desired.current.get(node)
        target = wanted.version if wanted is not None else None
        if target is not None and target != view.version:
            since = self.seen_desired.setdefault(f"{node}:{target}", now)
            if now - since >= self.update_delay:
                if node in self.bad:
                    self.fleet.update(node, update_state="rolled_back", reported_ts=now, health_ts=now, healthy=True)
                    self.seen_desired[f"{node}:{target}"] = float("inf")  # gives up on this release
                else:
                    self.fleet.update(node, version=target, update_state="healthy", reported_ts=now)
        if not (node in self.silent and self.fleet.views[node].version == self.releases.new.version):
            self.fleet.update(node, health_ts=now, healthy=True)

    def view(self, rollout_id: str) -> RolloutView:
        return self.engine.get(rollout_id)

    def outcome(self, rollout_id: str, node: str) -> NodeOutcome:
        return self.view(rollout_id).nodes[node]


@pytest.fixture
def sim(releases: Releases, tmp_path: Path) -> Iterator[Sim]:
    world = Sim(releases, tmp_path / "fleet.db")
    yield world
    world.db.close()


def request(**overrides: Any) -> RolloutRequest:
    values: dict[str, Any] = {
        "release": "app@2.0.0",
        "selector": {"site": "plant-3"},
        "soak": SOAK,
        "wave_timeout": WAVE_TIMEOUT,
        "health_timeout": HEALTH_TIMEOUT,
    }
    return RolloutRequest(**(values | overrides))


def wave_nodes(view: RolloutView, sim: Sim, index: int) -> list[str]:
    """Nodes of one wave, from the stored assignment."""
    rows = sim.db.query(
        "SELECT node FROM rollout_nodes WHERE rollout_id = ? AND wave = ? ORDER BY position", (view.id, index)
    )
    return [node for (node,) in rows]


# ---- the good path ----------------------------------------------------------------------------


def test_good_rollout_runs_three_waves_with_soak(sim: Sim) -> None:
    nodes = sim.add_nodes(10)
    view = sim.engine.start(request())
    assert [wave.nodes for wave in view.waves] == [1, 2, 7]
    assert view.state == RolloutState.RUNNING
    first = wave_nodes(view, sim, 0)
    assert sim.desired.to("2.0.0") == first  # only the first wave is asked to update
    ref = sim.desired.current[first[0]]
    assert ref is not None and ref.delta_bases == [sim.releases.old.digest]

    sim.run(sim.update_delay)  # the canary is now on 2.0.0 and healthy; the soak starts
    updated_at = sim.clock.now
    sim.run_until(lambda: sim.outcome(view.id, first[0]) == NodeOutcome.SUCCEEDED)
    assert sim.clock.now - updated_at >= SOAK  # not before the soak
    assert sim.clock.now - updated_at < SOAK + 1.0
    assert set(sim.desired.to("2.0.0")) == set(first + wave_nodes(view, sim, 1))

    sim.run_until(lambda: sim.view(view.id).state == RolloutState.SUCCEEDED)
    final = sim.view(view.id)
    assert all(outcome == NodeOutcome.SUCCEEDED for outcome in final.nodes.values())
    assert sorted(sim.desired.to("2.0.0")) == nodes  # each node exactly once
    assert [wave.counts[NodeOutcome.SUCCEEDED] for wave in final.waves] == [1, 2, 7]
    assert all(wave.finished_at is not None for wave in final.waves)
    assert sim.commands.sent == []
    assert sim.engine.counts()["succeeded"] == 1
    assert sim.engine.active() == []


def test_canary_nodes_go_first_and_the_order_is_stored(sim: Sim) -> None:
    sim.add_nodes(8)
    canaries = sim.add_nodes(2, operator={"ring": "canary"})
    view = sim.engine.start(request())
    assert wave_nodes(view, sim, 0)[0] in canaries
    assert set(canaries) <= set(wave_nodes(view, sim, 0) + wave_nodes(view, sim, 1))
    positions = sim.db.query("SELECT node FROM rollout_nodes WHERE rollout_id = ? ORDER BY position", (view.id,))
    assert {node for (node,) in positions[:2]} == set(canaries)


def test_a_node_reporting_ring_canary_itself_does_not_go_first(sim: Sim) -> None:
    """Only an operator puts a node in the canary ring: devices claiming it are ordered like any
    other node (and an operator's label wins over the one the node reports)."""
    sim.add_nodes(8)
    claimers = sim.add_nodes(30, ring="canary")
    (demoted,) = sim.add_nodes(1, ring="canary", operator={"ring": "main"})
    (canary,) = sim.add_nodes(1, ring="main", operator={"ring": "canary"})
    view = sim.engine.start(request(waves=["1", "100%"]))
    assert wave_nodes(view, sim, 0) == [canary]
    positions = [node for (node,) in sim.db.query(
        "SELECT node FROM rollout_nodes WHERE rollout_id = ? ORDER BY position", (view.id,))]  # fmt: skip
    # Pseudo-random among the rest: 30 of 39 claim the ring, they cannot all be right behind the canary.
    assert set(positions[1:31]) != set(claimers)
    assert demoted in positions[1:]


def test_node_already_on_the_target_succeeds_at_once_without_a_publication(sim: Sim) -> None:
    (node,) = sim.add_nodes(1, version="2.0.0")
    sim.desired.current[node] = sim.releases.new.ref()
    view = sim.engine.start(request())
    assert view.nodes[node] == NodeOutcome.SUCCEEDED
    assert sim.desired.published == []
    sim.step()
    assert sim.view(view.id).state == RolloutState.SUCCEEDED


# ---- failures and rollback --------------------------------------------------------------------


def test_bad_release_in_wave_1_aborts_and_rolls_back_every_touched_node(sim: Sim) -> None:
    sim.add_nodes(10)
    view = sim.engine.start(request())
    second = wave_nodes(view, sim, 1)
    sim.bad.update(second)
    sim.run_until(lambda: sim.view(view.id).state == RolloutState.ABORTED)
    final = sim.view(view.id)
    assert final.detail == "2 of 2 finished nodes failed in wave 2 (threshold 5%)"
    touched = wave_nodes(view, sim, 0) + second
    baseline = sim.releases.old.digest
    resets = [node for node, ref in sim.desired.published if ref is not None and ref.digest == baseline]
    assert sorted(resets) == sorted(touched)
    assert sorted(
        node for node, action, _, rid in sim.commands.sent if action == "rollback" and rid == view.id
    ) == sorted(touched)
    untouched = set(wave_nodes(view, sim, 2))
    assert not untouched & {node for node, _ in sim.desired.published}
    assert not untouched & {node for node, *_ in sim.commands.sent}
    # The fake agents go back to 1.0.0 on the baseline desired state: rolled_back in the view.
    sim.run_until(lambda: all(sim.outcome(view.id, node) == NodeOutcome.ROLLED_BACK for node in touched), limit=30)
    assert sim.view(view.id).waves[1].counts[NodeOutcome.ROLLED_BACK] == 2
    assert all(sim.outcome(view.id, node) == NodeOutcome.PENDING for node in untouched)
    sim.run(5)
    assert len(sim.commands.sent) == len(touched)  # nothing sent twice


def test_health_silence_after_the_update_is_failure_after_health_timeout(sim: Sim) -> None:
    (node,) = sim.add_nodes(1)
    sim.silent.add(node)
    view = sim.engine.start(request(soak=60.0))
    sim.run_until(lambda: sim.fleet.views[node].version == "2.0.0")
    on_target = sim.clock.now
    sim.run_until(lambda: sim.view(view.id).state != RolloutState.RUNNING)
    # Failed only once the silence exceeded health_timeout (within one tick of it), then rolled back.
    assert HEALTH_TIMEOUT < sim.clock.now - on_target <= HEALTH_TIMEOUT + 1.0
    final = sim.view(view.id)
    assert final.state == RolloutState.ABORTED
    assert final.detail is not None and "1 of 1 finished nodes failed in wave 1" in final.detail
    assert [(n, action) for n, action, *_ in sim.commands.sent] == [(node, "rollback")]


def test_reported_unhealthy_on_the_target_is_failure(sim: Sim) -> None:
    (node,) = sim.add_nodes(1)
    view = sim.engine.start(request(max_failures="2"))
    sim.run_until(lambda: sim.fleet.views[node].version == "2.0.0")
    sim.step()
    assert sim.outcome(view.id, node) == NodeOutcome.PENDING
    sim.clock.now += 0.5
    sim.fleet.update(node, healthy=False, health_ts=sim.clock.now)
    sim.engine.tick()
    assert sim.outcome(view.id, node) == NodeOutcome.FAILED
    # One failure under a count threshold of 2: the (single) wave completes, nothing aborted.
    assert sim.view(view.id).state == RolloutState.SUCCEEDED


def test_offline_node_is_unreachable_never_success_and_does_not_block_past_wave_timeout(sim: Sim) -> None:
    nodes = sim.add_nodes(4)
    sim.offline.add(nodes[2])
    sim.fleet.update(nodes[2], status=NodeStatus.OFFLINE, last_seen=sim.clock.now - 100)
    view = sim.engine.start(request(waves=["100%"], max_failures="1"))
    sim.run(SOAK + 2)
    current = sim.view(view.id)
    assert current.state == RolloutState.RUNNING  # waits for the offline node...
    assert current.nodes[nodes[2]] == NodeOutcome.PENDING
    sim.run_until(lambda: sim.view(view.id).state != RolloutState.RUNNING)
    assert sim.clock.now - view.created <= WAVE_TIMEOUT + 1.0  # ...but not past the wave timeout
    final = sim.view(view.id)
    assert final.state == RolloutState.SUCCEEDED
    assert final.nodes[nodes[2]] == NodeOutcome.UNREACHABLE
    assert final.waves[0].counts[NodeOutcome.UNREACHABLE] == 1
    assert final.waves[0].counts[NodeOutcome.SUCCEEDED] == 3
    assert final.detail == "3 succeeded, 1 unreachable"


def test_unreachable_node_that_returns_converges_while_the_rollout_runs(sim: Sim) -> None:
    nodes = sim.add_nodes(10)
    for node in nodes:  # all offline at the start, so the first wave's node is unreachable
        sim.fleet.update(node, status=NodeStatus.OFFLINE, last_seen=sim.clock.now - 100)
    view = sim.engine.start(request(waves=["1", "2"]))
    (late,) = wave_nodes(view, sim, 0)
    sim.offline.add(late)
    sim.run_until(lambda: sim.outcome(view.id, late) == NodeOutcome.UNREACHABLE)
    sim.offline.discard(late)
    sim.run_until(lambda: sim.outcome(view.id, late) == NodeOutcome.SUCCEEDED)
    assert sim.view(view.id).state == RolloutState.RUNNING
    sim.run_until(lambda: sim.view(view.id).state == RolloutState.SUCCEEDED)
    assert sorted(sim.desired.to("2.0.0")) == nodes


def test_threshold_with_min_finished(sim: Sim) -> None:
    nodes = sim.add_nodes(6)
    # 50% with at least 4 finished: the first failure (1 of 1) must not abort.
    view = sim.engine.start(request(waves=["100%"], max_failures="50%", min_finished=4))
    order = wave_nodes(view, sim, 0)
    sim.bad.add(order[0])
    sim.run_until(lambda: sim.outcome(view.id, order[0]) == NodeOutcome.FAILED)
    assert sim.view(view.id).state == RolloutState.RUNNING
    sim.run_until(lambda: sim.view(view.id).state != RolloutState.RUNNING)
    assert sim.view(view.id).state == RolloutState.SUCCEEDED  # 1 of 6 < 50%
    assert len(sim.desired.to("2.0.0")) == len(nodes)


def test_threshold_reached_once_enough_nodes_finished(sim: Sim) -> None:
    sim.add_nodes(6)
    view = sim.engine.start(request(waves=["100%"], max_failures="50%", min_finished=4))
    order = wave_nodes(view, sim, 0)
    sim.bad.update(order[:3])
    sim.run_until(lambda: sim.view(view.id).waves[0].counts[NodeOutcome.FAILED] == 3)
    assert sim.view(view.id).state == RolloutState.RUNNING  # 3 finished < min_finished
    sim.run_until(lambda: sim.view(view.id).state != RolloutState.RUNNING)
    final = sim.view(view.id)
    assert final.state == RolloutState.ABORTED
    # The good nodes finish together after the soak: 3 of 6 is 50%.
    assert final.detail == "3 of 6 finished nodes failed in wave 1 (threshold 50%)"


@pytest.mark.parametrize(
    ("spec", "failed", "finished", "breached"),
    [
        ("5%", 1, 1, True),
        ("5%", 0, 10, False),
        ("50%", 1, 3, False),  # below min_finished (4)
        ("50%", 2, 4, True),
        ("50%", 1, 4, False),
        ("3", 2, 2, False),
        ("3", 3, 100, True),
    ],
)
def test_abort_criteria(spec: str, failed: int, finished: int, breached: bool) -> None:
    min_finished = 4 if spec == "50%" else 1
    assert AbortCriteria.parse(spec, min_finished).breached(failed, finished) is breached


@pytest.mark.parametrize(
    ("waves", "total", "ends"),
    [
        (["1%", "25%", "100%"], 10, [1, 3, 10]),
        (["1%", "25%", "100%"], 2, [1, 2]),
        (["1%", "25%", "100%"], 1, [1]),
        (["1%", "25%", "100%"], 100, [1, 25, 100]),
        (["5", "20"], 100, [5, 20, 100]),  # the rest is never silently left behind
        (["5", "20"], 10, [5, 10]),
        (["2", "50%"], 10, [2, 5, 10]),
    ],
)
def test_parse_waves(waves: list[str], total: int, ends: list[int]) -> None:
    assert parse_waves(waves, total) == ends


# ---- operator actions -------------------------------------------------------------------------


def test_pause_holds_the_next_wave_and_resume_continues(sim: Sim) -> None:
    sim.add_nodes(10)
    view = sim.engine.start(request())
    assert sim.engine.pause(view.id).state == RolloutState.PAUSED
    with pytest.raises(Conflict):
        sim.engine.pause(view.id)
    sim.run(SOAK + 10)
    paused = sim.view(view.id)
    assert paused.nodes[wave_nodes(view, sim, 0)[0]] == NodeOutcome.SUCCEEDED  # the wave is still watched
    assert paused.current_wave == 0
    assert len(sim.desired.to("2.0.0")) == 1
    assert sim.engine.resume(view.id).state == RolloutState.RUNNING
    with pytest.raises(Conflict):
        sim.engine.resume(view.id)
    sim.step()
    assert sim.view(view.id).current_wave == 1
    sim.run_until(lambda: sim.view(view.id).state == RolloutState.SUCCEEDED)


def test_operator_abort_rolls_back_touched_nodes(sim: Sim) -> None:
    sim.add_nodes(10)
    view = sim.engine.start(request())
    sim.run(2)
    aborted = sim.engine.abort(view.id)
    assert aborted.state == RolloutState.ABORTED
    assert aborted.detail == "aborted by the operator"
    assert [node for node, *_ in sim.commands.sent] == wave_nodes(view, sim, 0)
    with pytest.raises(Conflict):
        sim.engine.abort(view.id)
    with pytest.raises(Conflict):
        sim.engine.resume(view.id)
    # A finished rollout frees its nodes for the next one.
    assert sim.engine.start(request()).state == RolloutState.RUNNING


# ---- durability -------------------------------------------------------------------------------


def test_restart_mid_wave_resumes_the_same_wave_without_republishing(sim: Sim) -> None:
    nodes = sim.add_nodes(10)
    view = sim.engine.start(request())
    sim.run_until(lambda: sim.view(view.id).current_wave == 1)
    sim.run(2)
    second = wave_nodes(view, sim, 1)
    before = list(sim.desired.published)
    assert {node for node, _ in before} == set(wave_nodes(view, sim, 0) + second)
    started = sim.db.query("SELECT node, started_at FROM rollout_nodes WHERE rollout_id = ? AND wave = 1", (view.id,))

    sim.restart()
    assert sim.view(view.id).current_wave == 1
    sim.step()
    assert sim.desired.published == before  # no node asked twice
    assert (
        sim.db.query("SELECT node, started_at FROM rollout_nodes WHERE rollout_id = ? AND wave = 1", (view.id,))
        == started
    )
    sim.run_until(lambda: sim.view(view.id).state == RolloutState.SUCCEEDED)
    assert sorted(sim.desired.to("2.0.0")) == nodes
    final = sim.view(view.id)
    assert all(wave.started_at is not None and wave.finished_at is not None for wave in final.waves)
    assert [wave.started_at for wave in final.waves] == sorted(wave.started_at or 0 for wave in final.waves)


def test_crash_around_the_publish_publishes_exactly_once(sim: Sim) -> None:
    nodes = sim.add_nodes(3)
    sim.desired.fail_after_publish.add(nodes[0])  # published, but "updated" never committed
    sim.desired.fail_before_publish.add(nodes[1])  # "updating" committed, never published
    view = sim.engine.start(request(waves=["100%"]))
    assert sim.db.query("SELECT COUNT(*) FROM rollout_nodes WHERE phase = 'updating'") == [(2,)]
    sim.restart()
    sim.step()
    assert sorted(sim.desired.to("2.0.0")) == nodes  # nodes[0] not asked again, nodes[1] asked now
    assert sim.db.query("SELECT COUNT(*) FROM rollout_nodes WHERE phase = 'updated'") == [(3,)]
    sim.run_until(lambda: sim.view(view.id).state == RolloutState.SUCCEEDED)


# ---- per-node isolation -----------------------------------------------------------------------


def test_a_node_that_cannot_be_reset_does_not_stop_the_abort_of_the_others(sim: Sim) -> None:
    """The bug a lying device caused: its baseline publish failing stopped every other node's reset
    and rollback command on every tick, and the rollout stayed aborting."""
    nodes = sim.add_nodes(6)
    view = sim.engine.start(request(waves=["100%"]))
    sim.run(2)  # every node updated
    liar = nodes[0] if wave_nodes(view, sim, 0)[0] == nodes[0] else wave_nodes(view, sim, 0)[0]
    sim.desired.broken.add(liar)
    aborting = sim.engine.abort(view.id)
    others = [node for node in nodes if node != liar]
    baseline = sim.releases.old.digest
    # At once, in the abort call itself: every other node got its baseline and its rollback command.
    resets = {node for node, ref in sim.desired.published if ref is not None and ref.digest == baseline}
    assert resets == set(others)
    assert {node for node, action, *_ in sim.commands.sent if action == "rollback"} == set(others)
    assert aborting.state == RolloutState.ABORTING  # the liar is retried on the next ticks
    for _ in range(3):
        sim.engine.tick()
    final = sim.view(view.id)
    assert final.state == RolloutState.ABORTED
    assert final.detail == f"aborted by the operator; not restored: {liar}"
    assert final.nodes[liar] == NodeOutcome.FAILED
    (reason,) = sim.db.query("SELECT reason FROM rollout_nodes WHERE rollout_id = ? AND node = ?", (view.id, liar))[0]
    assert reason.startswith("not restored: baseline desired state not published: ValueError")
    # It still got its rollback command (the agent marks the release left behind), exactly once each.
    rollbacks = [node for node, action, *_ in sim.commands.sent if action == "rollback"]
    assert sorted(rollbacks) == sorted(nodes)
    assert sim.engine.node_errors["reset"] == 3
    assert sim.engine.metrics() == {'fleet_rollout_node_errors_total{step="reset"}': 3.0}
    sim.run(5)
    assert sorted(node for node, action, *_ in sim.commands.sent if action == "rollback") == sorted(nodes)


def test_a_node_that_cannot_get_its_rollback_command_is_given_up_and_the_rollout_aborts(sim: Sim) -> None:
    nodes = sim.add_nodes(4)
    view = sim.engine.start(request(waves=["100%"]))
    sim.run(2)
    sim.commands.broken.add(nodes[1])
    assert sim.engine.abort(view.id).state == RolloutState.ABORTING
    sim.engine.tick()
    sim.engine.tick()
    final = sim.view(view.id)
    assert final.state == RolloutState.ABORTED
    assert final.nodes[nodes[1]] == NodeOutcome.FAILED
    assert sorted(node for node, *_ in sim.commands.sent) == sorted(set(nodes) - {nodes[1]})
    phase = sim.db.query("SELECT phase FROM rollout_nodes WHERE rollout_id = ? AND node = ?", (view.id, nodes[1]))
    assert phase == [("rollback_failed",)]
    # The baseline desired state reached it anyway: the fake agent goes back and is confirmed.
    sim.run_until(lambda: sim.outcome(view.id, nodes[1]) == NodeOutcome.ROLLED_BACK, limit=30)


def test_a_node_that_cannot_be_judged_fails_alone(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = sim.add_nodes(4)
    original = rollouts.classify

    def classify(track: rollouts.Track, view: NodeView | None, clock: rollouts.WaveClock) -> rollouts.Track:
        if track.node == nodes[2]:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return original(track, view, clock)

    monkeypatch.setattr(rollouts, "classify", classify)
    view = sim.engine.start(request(waves=["100%"], max_failures="2"))
    sim.run_until(lambda: sim.view(view.id).state != RolloutState.RUNNING)
    final = sim.view(view.id)
    assert final.state == RolloutState.SUCCEEDED  # one failure under a threshold of 2
    assert final.nodes[nodes[2]] == NodeOutcome.FAILED
    assert all(final.nodes[node] == NodeOutcome.SUCCEEDED for node in nodes if node != nodes[2])
    assert sim.engine.node_errors["classify"] == 1


def test_a_node_that_cannot_be_started_is_failed_and_the_wave_goes_on(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = sim.add_nodes(4)
    original = RolloutEngine._commit_start

    def commit_start(self: RolloutEngine, tx: Any, rollout: Any, node: str, view: NodeView | None, now: float) -> None:
        if node == nodes[3]:
            raise ValueError("bad data")
        original(self, tx, rollout, node, view, now)

    monkeypatch.setattr(RolloutEngine, "_commit_start", commit_start)
    view = sim.engine.start(request(waves=["100%"], max_failures="2"))
    assert sorted(sim.desired.to("2.0.0")) == sorted(set(nodes) - {nodes[3]})
    sim.run_until(lambda: sim.view(view.id).state != RolloutState.RUNNING)
    final = sim.view(view.id)
    assert final.nodes[nodes[3]] == NodeOutcome.FAILED
    assert final.state == RolloutState.SUCCEEDED
    assert nodes[3] not in sim.desired.to("2.0.0")


def test_a_node_whose_view_cannot_be_read_is_judged_unknown(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = sim.add_nodes(3)
    view = sim.engine.start(request(waves=["100%"], wave_timeout=20.0, max_failures="2"))
    sim.fleet.update(nodes[0], labels={}, reported_labels={})  # leaves the selector: read one by one

    def node_view(node_id: str) -> NodeView:
        raise RuntimeError("corrupt registry row")

    monkeypatch.setattr(sim.fleet, "node_view", node_view)
    sim.run_until(lambda: sim.view(view.id).state != RolloutState.RUNNING)
    final = sim.view(view.id)
    assert final.nodes[nodes[1]] == final.nodes[nodes[2]] == NodeOutcome.SUCCEEDED
    assert final.nodes[nodes[0]] in (NodeOutcome.FAILED, NodeOutcome.UNREACHABLE)
    assert sim.engine.node_errors["view"] > 0


def test_restart_during_rollback_finishes_it_without_duplicates(sim: Sim) -> None:
    sim.add_nodes(10)
    view = sim.engine.start(request(waves=["3", "100%"]))
    touched = wave_nodes(view, sim, 0)
    sim.run(2)
    sim.commands.fail.add(touched[1])
    assert sim.engine.abort(view.id).state == RolloutState.ABORTING  # interrupted mid-rollback
    sim.restart()
    sim.step()
    assert sim.view(view.id).state == RolloutState.ABORTED
    assert sorted(node for node, *_ in sim.commands.sent) == sorted(touched)
    resets = [node for node, ref in sim.desired.published if ref is not None and ref.version == "1.0.0"]
    assert sorted(resets) == sorted(touched)


# ---- bad input --------------------------------------------------------------------------------


def test_unknown_release_is_not_found(sim: Sim) -> None:
    sim.add_nodes(2)
    with pytest.raises(NotFound, match=r"app@9\.9\.9"):
        sim.engine.start(request(release="app@9.9.9"))
    with pytest.raises(BadRequest):
        sim.engine.start(request(release="app"))
    with pytest.raises(NotFound):
        sim.engine.get("r-nope")


@pytest.mark.parametrize(
    "waves",
    [[], ["25%", "1%"], ["5", "5"], ["abc"], ["0%"], ["150%"], ["0"], ["2.5"], ["-1"], ["10", "1%"]],
)
def test_malformed_waves_are_bad_requests(sim: Sim, waves: list[str]) -> None:
    sim.add_nodes(200)
    with pytest.raises(BadRequest):
        sim.engine.start(request(waves=waves))
    assert sim.engine.list() == []


@pytest.mark.parametrize("max_failures", ["", "x", "0", "0%", "101%", "-3"])
def test_malformed_max_failures_are_bad_requests(sim: Sim, max_failures: str) -> None:
    sim.add_nodes(2)
    with pytest.raises(BadRequest):
        sim.engine.start(request(max_failures=max_failures))


def test_selector_matching_nothing_is_a_bad_request(sim: Sim) -> None:
    sim.add_nodes(2)
    with pytest.raises(BadRequest, match="matches no node"):
        sim.engine.start(request(selector={"site": "nowhere"}))
    assert sim.engine.counts() == {state.value: 0 for state in RolloutState}


def test_second_rollout_on_the_same_selector_or_nodes_conflicts(sim: Sim) -> None:
    sim.add_nodes(3)
    sim.add_nodes(2, ring="canary")
    first = sim.engine.start(request())
    with pytest.raises(Conflict, match=first.id):
        sim.engine.start(request())
    with pytest.raises(Conflict, match=first.id):  # a different selector over the same nodes
        sim.engine.start(request(selector={"ring": "canary"}))
    assert [view.id for view in sim.engine.list()] == [first.id]
    assert sim.engine.counts()["running"] == 1
