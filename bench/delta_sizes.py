"""Delta sizes on a real binary pair: zstd -19 full vs our zstd patch-from vs bsdiff4 vs xdelta3.

Inputs: the Mosquitto broker binary from two Debian builds (``apt-get download``), else the
compiled extension of two zstandard wheels (``pip download``). Downloads are cached in
``--cache`` (default ``~/.cache/fleet-bench``), so later runs work offline. Prints one JSON object;
anything skipped (a missing tool, no network) is listed under ``skipped`` with the reason.

    .venv/bin/python bench/delta_sizes.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.releases import apply_delta, compress_full, make_delta, sha256_digest

MOSQUITTO_VERSIONS = ("2.0.11-1.2+deb12u1", "2.0.11-1.2+deb12u2")
MOSQUITTO_BINARY = "usr/sbin/mosquitto"
WHEEL_VERSIONS = ("0.23.0", "0.24.0")
_PIP_DOWNLOAD = (sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fleet-bench")
    args = parser.parse_args()
    skipped: list[str] = []
    pair = _mosquitto_pair(args.cache, skipped) or _wheel_pair(args.cache, skipped)
    if pair is None:
        print(json.dumps({"error": "no input pair available", "skipped": skipped}, indent=2))
        sys.exit(1)
    label, old, new = pair
    result: dict[str, Any] = {"input": label, "old_size": len(old), "new_size": len(new)}
    result.update(_ours(old, new))
    result.update(_bsdiff4(old, new, skipped))
    result.update(_xdelta3(old, new, skipped))
    for key in [key for key in result if key.endswith("_size") and key not in {"old_size", "new_size"}]:
        result[key.removesuffix("_size") + "_pct_of_new"] = round(100 * result[key] / len(new), 2)
    if label.startswith("mosquitto"):
        # Not in the percentages above: the denominator here is the whole package tree.
        result.update(_store_pair(args.cache))
    result["skipped"] = skipped
    print(json.dumps(result, indent=2))


# --- inputs -------------------------------------------------------------------------------------


def _mosquitto_pair(cache: Path, skipped: list[str]) -> tuple[str, bytes, bytes] | None:
    binaries = []
    for version in MOSQUITTO_VERSIONS:
        target = cache / f"mosquitto-{version}" / MOSQUITTO_BINARY
        if not target.is_file():
            deb = _apt_download(cache, "mosquitto", version, skipped)
            if deb is None:
                return None
            subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / f"mosquitto-{version}")], check=True)
        binaries.append(target.read_bytes())
    return f"mosquitto {MOSQUITTO_VERSIONS[0]} -> {MOSQUITTO_VERSIONS[1]} ({MOSQUITTO_BINARY})", *binaries


def _apt_download(cache: Path, package: str, version: str, skipped: list[str]) -> Path | None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        skipped.append("mosquitto pair: apt-get/dpkg-deb not available")
        return None
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["apt-get", "download", f"{package}={version}"], cwd=cache, capture_output=True, text=True, check=False
    )
    found = sorted(cache.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))  # apt escapes an epoch
    if done.returncode != 0 or not found:
        skipped.append(f"mosquitto pair: apt-get download {package}={version} failed: {done.stderr.strip()[-200:]}")
        return None
    return found[0]


def _wheel_pair(cache: Path, skipped: list[str]) -> tuple[str, bytes, bytes] | None:
    import zipfile

    binaries = []
    for version in WHEEL_VERSIONS:
        directory = cache / f"zstandard-{version}"
        wheels = sorted(directory.glob("*.whl"))
        if not wheels:
            done = subprocess.run(
                [*_PIP_DOWNLOAD, f"zstandard=={version}", "-d", str(directory)],
                capture_output=True,
                text=True,
                check=False,
            )
            wheels = sorted(directory.glob("*.whl"))
            if done.returncode != 0 or not wheels:
                skipped.append(f"wheel pair: pip download zstandard=={version} failed")
                return None
        with zipfile.ZipFile(wheels[0]) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith(".so") and "backend_c" in n)
            binaries.append(wheel.read(name))
    return f"zstandard {WHEEL_VERSIONS[0]} -> {WHEEL_VERSIONS[1]} (backend_c .so)", *binaries


def _store_pair(cache: Path) -> dict[str, Any]:
    """The same pair as whole release payloads: the extracted package trees built into a store."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fleet.releases import ReleaseStore, build_release

    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as store_dir:
        store = Path(store_dir)
        old, new = (
            build_release(
                cache / f"mosquitto-{version}",
                name="mosquitto",
                version=version,
                store=store,
                release_key=key,
                entry=["usr/sbin/mosquitto"],
                health=None,
                chunk_size=64 * 1024,
            )
            for version in MOSQUITTO_VERSIONS
        )
        releases = ReleaseStore(store)
        start = time.perf_counter()
        delta = releases.delta(old, new)
        seconds = round(time.perf_counter() - start, 4)
        return {
            "store_payload_size": new.size,
            "store_full_artifact_size": releases.artifact_path(new).stat().st_size,
            "store_delta_size": delta.stat().st_size if delta is not None else None,
            "store_delta_seconds": seconds,
        }


# --- measurements -------------------------------------------------------------------------------


def _timed(action: Callable[[], bytes]) -> tuple[bytes, float]:
    start = time.perf_counter()
    out = action()
    return out, round(time.perf_counter() - start, 4)


def _ours(old: bytes, new: bytes) -> dict[str, Any]:
    full, full_seconds = _timed(lambda: compress_full(new))
    delta, build_seconds = _timed(lambda: make_delta(old, new))
    restored, apply_seconds = _timed(lambda: apply_delta(old, delta, sha256_digest(new)))
    assert restored == new
    return {
        "zstd19_full_size": len(full),
        "zstd19_full_seconds": full_seconds,
        "zstd_patch_from_size": len(delta),
        "zstd_patch_from_build_seconds": build_seconds,
        "zstd_patch_from_apply_seconds": apply_seconds,
    }


def _bsdiff4(old: bytes, new: bytes, skipped: list[str]) -> dict[str, Any]:
    try:
        import bsdiff4  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        skipped.append("bsdiff4: not installed (pip install bsdiff4)")
        return {}
    patch, build_seconds = _timed(lambda: bsdiff4.diff(old, new))
    restored, apply_seconds = _timed(lambda: bsdiff4.patch(old, patch))
    assert restored == new
    return {"bsdiff4_size": len(patch), "bsdiff4_build_seconds": build_seconds, "bsdiff4_apply_seconds": apply_seconds}


def _xdelta3(old: bytes, new: bytes, skipped: list[str]) -> dict[str, Any]:
    if shutil.which("xdelta3") is None:
        skipped.append("xdelta3: not installed (apt-get install xdelta3)")
        return {}
    with tempfile.TemporaryDirectory() as work:
        base, target, patch, out = (Path(work) / name for name in ("old", "new", "patch", "out"))
        base.write_bytes(old)
        target.write_bytes(new)
        start = time.perf_counter()
        subprocess.run(["xdelta3", "-e", "-9", "-f", "-s", str(base), str(target), str(patch)], check=True)
        build_seconds = round(time.perf_counter() - start, 4)
        start = time.perf_counter()
        subprocess.run(["xdelta3", "-d", "-f", "-s", str(base), str(patch), str(out)], check=True)
        apply_seconds = round(time.perf_counter() - start, 4)
        assert out.read_bytes() == new
        return {
            "xdelta3_size": patch.stat().st_size,
            "xdelta3_build_seconds": build_seconds,
            "xdelta3_apply_seconds": apply_seconds,
        }


if __name__ == "__main__":
    main()
