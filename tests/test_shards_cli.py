"""The command line: one-line errors with exit code 2, resume after SIGKILL, inspect --check."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.__main__ import main
from tests.shards_testutil import tiny_coco, write_json

ROOT = Path(__file__).resolve().parents[1]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    images, captions, _ = tiny_coco(tmp_path, n=1)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"images": [1, 2,')
    a_list = write_json(tmp_path / "list.json", [1, 2])
    no_key = write_json(tmp_path / "nokey.json", {"images": [{"id": 1, "file_name": "x.jpg", "width": 5}],
                                                  "annotations": []})
    cases = [
        (["coco", "--images", str(images), "--captions", str(tmp_path / "absent.json")], "absent.json: no such file"),
        (["coco", "--images", str(tmp_path / "nodir"), "--captions", str(captions)], "nodir: no such directory"),
        (["coco", "--images", str(images), "--captions", str(bad_json)], "bad.json: malformed JSON"),
        (["coco", "--images", str(images), "--captions", str(a_list)], "list.json: expected a JSON object"),
        (["coco", "--images", str(images), "--captions", str(no_key)], "nokey.json: images[0] lacks key(s) 'height'"),
        (["coco", "--images", str(images), "--captions", str(captions), "--instances", str(captions)],
         "captions.json: missing top-level key 'categories'"),
        (["vg", "--images", str(images), "--image-data", str(captions), "--regions", str(captions)],
         "captions.json: expected a JSON list"),
        (["objects365", "--images", str(images), "--annotations", str(a_list)], "list.json: expected a JSON object"),
        (["img2dataset", "--input", str(images), "--source", "cc3m"], "no img2dataset NNNNN.tar files"),
        (["coco", "--images", str(images), "--captions", str(captions), "--exclude-refer", str(tmp_path / "norefer")],
         "norefer"),
        (["inspect", str(tmp_path)], "not a shard directory"),
    ]
    for argv, expected in cases:
        rc = main(argv + (["--out", str(tmp_path / "out")] if argv[0] != "inspect" else []))
        lines = _err_lines(capsys)
        assert rc == 2, argv
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, lines)


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    r = _cli("vg", "--images", str(tmp_path), "--image-data", str(tmp_path / "x.json"), "--regions",
             str(tmp_path / "y.json"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'x.json'}: no such file")


def test_synthetic_subcommand(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "raw"), "--images", "8", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["seed"] == 3 and summary["coco"]["images"] == 8
    for p in ("coco/annotations/captions_train2017.json", "vg/image_data.json", "cc3m/00000.tar",
              "objects365/zhiyuan_objv2_train.json", "refer/refcoco/refs(unc).p"):
        assert (tmp_path / "raw" / p).is_file(), p


def test_inspect_check_finds_corruption(tmp_path, capsys):
    images, captions, instances = tiny_coco(tmp_path, n=4)
    out = tmp_path / "out"
    assert main(["coco", "--images", str(images), "--captions", str(captions), "--instances", str(instances),
                 "--out", str(out), "--samples-per-shard", "2"]) == 0
    assert main(["inspect", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "check: OK" in printed and "coco-1:" in printed and "object: 'car'" in printed
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first JPEG's bytes
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(out), "--check"]) == 1
    assert "sha256 differs" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    m["captions"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    shutil.copy(tmp_path / "out" / "shard-000000.tar", tmp_path / "out" / "shard-000009.tar")
    assert main(["inspect", str(out), "--check"]) == 1
    printed = capsys.readouterr().out
    assert "captions = 8, manifest says 9" in printed and "shard-000009.tar: shard not in the manifest" in printed


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_manifest(tmp_path):
    images, captions, instances = tiny_coco(tmp_path, n=1, size=(1600, 1200))
    cap = json.loads(captions.read_text())
    src = images / "000000000001.jpg"
    for i in range(2, 61):  # 60 large images: several seconds of work, so the kill lands mid-run
        shutil.copy(src, images / f"{i:012d}.jpg")
        cap["images"].append({**cap["images"][0], "id": i, "file_name": f"{i:012d}.jpg"})
        cap["annotations"].append({"id": 1000 + i, "image_id": i, "caption": f"image {i}"})
    captions.write_text(json.dumps(cap))
    out = tmp_path / "out"
    argv = ["coco", "--images", str(images), "--captions", str(captions), "--out", str(out),
            "--samples-per-shard", "5", "--max-side", "640"]
    assert _cli(*argv).returncode == 0
    full = json.loads((out / "manifest.json").read_text())
    full_bytes = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    shutil.rmtree(out)

    proc = subprocess.Popen([sys.executable, "-m", "shards", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not (out / "shard-000000.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("shard-*.tar"))
    assert not (out / "manifest.json").exists() and 1 <= len(finished) < 12, finished
    kept = {n: (out / n).stat().st_mtime_ns for n in finished}
    assert _cli(*argv).returncode == 0
    assert json.loads((out / "manifest.json").read_text()) == full
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == full_bytes
    assert not list(out.glob("*.tmp-*"))
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())  # finished shards were not rewritten
