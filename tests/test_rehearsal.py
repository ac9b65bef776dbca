"""The recipe rehearsal (scripts/rehearse.sh): the shipped stage-1 and stage-3 configs with the tiny
model on the miniature datasets, stage 1 -> stage 3 (in-loop evaluation, kill -9 and resume with
every loss equal to an uninterrupted run's) -> eval.py over every benchmark of the paper, on 8
simulated devices and on 2 processes x 4 devices. Slow: tens of minutes on a 2-core CPU."""

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mesh", "processes"])
def test_rehearsal(mode, tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "rehearse.sh"), str(tmp_path), mode], capture_output=True,
                          text=True, timeout=7200, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert "every logged loss equals the uninterrupted run's" in proc.stdout

    stage3 = [json.loads(line) for line in (tmp_path / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("eval/") for record in stage3 for key in record)          # the in-loop evaluation
    config = json.loads((tmp_path / "stage3" / "config.json").read_text())
    assert config["model"]["init"]["stage1"] == str(tmp_path / "stage1")

    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    benchmarks = set(config["eval"]["datasets"]) | set(config["eval"]["averages"])     # + the V-GCG mean row
    assert set(results) == benchmarks, benchmarks ^ set(results)
    for name in ("ytvis19", "ytvis21", "ref_ytvos", "ytvos19"):                         # withheld splits
        archive = tmp_path / "eval" / results[name]["submission"]      # relative to the output
        assert archive.is_file() and zipfile.ZipFile(archive).namelist(), name
    for name in ("coco_panoptic", "refcoco_val", "ref_davis17", "revos", "vipseg", "vspw"):
        assert results[name]["samples"] >= 1 and not results[name].get("submission"), name
