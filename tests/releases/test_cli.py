"""``fleet release`` through Typer's runner on the sub-app (``fleet.cli`` mounts it at startup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import certs
from fleet.cli import release_cmd
from tests.releases import binaryish, make_tree, patch


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(release_cmd.app, [str(arg) for arg in args])


def _assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleet: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki") / "pki"
    certs.init_pki(root)
    return root


def _build(source: Path, store: Path, pki: Path, version: str, *extra: str) -> Result:
    return _run("build", source, "--name", "app", "--version", version, "--certs", pki, "--store", store, *extra)


def test_build_ls_delta_verify(tmp_path: Path, pki: Path) -> None:
    program = binaryish(31, 1024 * 1024)
    store = tmp_path / "store"
    v1 = make_tree(tmp_path / "v1", app=bytes(program))
    v2 = make_tree(tmp_path / "v2", app=bytes(patch(program, 32, edits=2, edit_size=2048)))

    result = _build(v1, store, pki, "1.1.0", "--entry", "bin/app --port 8080", "--health-tcp", "127.0.0.1:8080")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("built app@1.1.0 sha256:")
    assert _build(v2, store, pki, "1.2.0", "--chunk-size", "32KiB").exit_code == 0

    listed = _run("ls", "--store", store, "-o", "json")
    assert listed.exit_code == 0, listed.output
    releases = json.loads(listed.stdout)
    assert [(r["name"], r["version"]) for r in releases] == [("app", "1.1.0"), ("app", "1.2.0")]
    assert releases[0]["entry"] == ["bin/app", "--port", "8080"]
    assert releases[0]["health"]["kind"] == "tcp"
    assert releases[1]["entry"] == ["./run"]  # the default
    assert releases[1]["chunk_size"] == 32 * 1024
    assert "health" not in releases[1]
    assert all(r["artifact_size"] > 0 for r in releases)

    table = _run("ls", "--store", store)
    assert table.exit_code == 0 and "1.2.0" in table.stdout

    delta = _run("delta", "--store", store, "app@1.1.0", "app@1.2.0", "-o", "json")
    assert delta.exit_code == 0, delta.output
    report = json.loads(delta.stdout)
    assert Path(report["delta"]).is_file()
    assert report["delta_size"] < 0.1 * report["full_size"]
    text = _run("delta", "--store", store, "app@1.1.0", "app@1.2.0")
    assert "of the full artifact" in text.stdout

    verified = _run("verify", "--store", store, "app@1.2.0", "--certs", pki)
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("ok app@1.2.0 sha256:")


def test_delta_not_worth_it_says_full_artifact(tmp_path: Path, pki: Path) -> None:
    store = tmp_path / "store"
    assert _build(make_tree(tmp_path / "a", app=bytes(binaryish(41, 200_000))), store, pki, "1").exit_code == 0
    assert _build(make_tree(tmp_path / "b", app=bytes(binaryish(42, 200_000))), store, pki, "2").exit_code == 0
    result = _run("delta", "--store", store, "app@1", "app@2")
    assert result.exit_code == 0, result.output
    assert "the full artifact will be used" in result.stdout


def test_verify_with_another_pki_is_a_one_line_error(tmp_path: Path, pki: Path) -> None:
    store = tmp_path / "store"
    assert _build(make_tree(tmp_path / "src"), store, pki, "1").exit_code == 0
    other = certs.init_pki(tmp_path / "other").root
    _assert_one_line_error(_run("verify", "--store", store, "app@1", "--certs", other), "manifest.json", "signature")


def test_flipped_artifact_byte_is_a_one_line_error(tmp_path: Path, pki: Path) -> None:
    store = tmp_path / "store"
    assert _build(make_tree(tmp_path / "src", app=bytes(binaryish(7, 100_000))), store, pki, "1").exit_code == 0
    artifact = store / "app" / "1" / "payload.tar.zst"
    data = bytearray(artifact.read_bytes())
    data[-20] ^= 0xFF
    artifact.write_bytes(bytes(data))
    _assert_one_line_error(_run("verify", "--store", store, "app@1", "--certs", pki), str(artifact))


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--chunk-size", "1MiB"), ("--chunk-size '1MiB'", "128KiB")),
        (("--chunk-size", "lots"), ("--chunk-size 'lots'",)),
        (("--entry", "bin/nope"), ("bin/nope does not exist",)),
        (("--health-tcp", "localhost"), ("--health-tcp 'localhost'", "HOST:PORT")),
        (("--health-http", "http://x/", "--health-exec", "true"), ("exclusive",)),
        (("--chunk-size", "128"), ("chunks of 128 bytes", "--chunk-size")),
    ],
)
def test_bad_build_options_are_one_line_errors(
    tmp_path: Path, pki: Path, extra: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    source = make_tree(tmp_path / "src", app=bytes(200_000))
    _assert_one_line_error(_build(source, tmp_path / "store", pki, "1", *extra), *fragments)


def test_build_errors_are_one_line(tmp_path: Path, pki: Path) -> None:
    store = tmp_path / "store"
    source = make_tree(tmp_path / "src")
    assert _build(source, store, pki, "1").exit_code == 0
    _assert_one_line_error(_build(source, store, pki, "1"), "app@1 already exists", "--force")
    assert _build(source, store, pki, "1", "--force").exit_code == 0
    _assert_one_line_error(
        _build(tmp_path / "nowhere", store, pki, "2", "--entry", "sleep 1"), "nowhere: not a directory"
    )
    _assert_one_line_error(_build(source, store, tmp_path / "nopki", "2"), "release.key")
    (source / "escape").symlink_to("../../etc/passwd")
    _assert_one_line_error(_build(source, store, pki, "3"), "escape", "escapes the release tree")


def test_lookup_errors_are_one_line(tmp_path: Path, pki: Path) -> None:
    store = tmp_path / "store"
    assert _build(make_tree(tmp_path / "src"), store, pki, "1").exit_code == 0
    _assert_one_line_error(_run("delta", "--store", store, "app@1", "app@9"), "app@9: no such release")
    _assert_one_line_error(_run("delta", "--store", store, "app", "app@1"), "'app': expected NAME@VERSION")
    _assert_one_line_error(_run("verify", "--store", store, "nope@1", "--certs", pki), "nope@1")
