"""Turnaround of the sample slide: first C-STORE to the last result accepted by Orthanc.

Starts Orthanc (the PACS) and a fresh ``cytonode serve`` (embedded worker) on free loopback
ports, sends ``dicom_node/data/sample_slide`` with DCMTK's ``storescu -R -xy`` and waits until
the SR, the bulk annotations and the heatmap SEG are in Orthanc. The time is broken down by
stage from the node's own records (job timestamps, the job's per-stage timings, the outbox's
``sent_at``). As a baseline measured in the same run, the same slide is sent by ``storescu``
straight into Orthanc; the ratio says how much longer than a plain transfer the analysis takes.

    .venv/bin/python bench/turnaround.py [--rounds 1] [--stable-age 2] [--json]
    .venv/bin/python bench/turnaround.py --slide all-bccd

``--slide all-bccd`` builds a slide from all 364 BCCD fields (``cytonode make-slide --gap-um 16``,
hundreds of white cells: the size of a real differential) and, while the job runs, records the
progress ``cytonode status --json`` shows, to say how a user follows a long job.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.app.demo import SAMPLE_SLIDE  # noqa: E402
from tests.peers import NodeProcess, OrthancProcess  # noqa: E402

STAGES = ("receive", "stable wait", "read", "detect", "crop", "classify", "heatmap", "encode",
          "job other", "send")


def storescu(port: int, aet: str, files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["storescu", "-R", "-xy", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def all_bccd_slide(out: Path) -> list[Path]:
    """A VL WSM series of every BCCD field, 16 um of glass between them."""
    from dicom_node.make_slide import make_slide

    fields = sorted((ROOT.parent / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))
    if not fields:
        raise SystemExit("the BCCD fields are not in ../shared/data/bccd")
    return make_slide(fields, out, gap_um=16.0)


def one_round(work: Path, files: list[Path], stable_age: float) -> dict[str, float]:
    orthanc = OrthancProcess(work / "orthanc", {}).start()
    node = NodeProcess(work / "node", workers=1, stable_age_s=stable_age, outbox_retry_initial_s=0.5,
                       destinations=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    try:
        node.start()
        baseline = storescu(orthanc.dicom_port, orthanc.aet, files)  # plain transfer, same run
        t0 = time.time()
        storescu(node.port, "CYTONODE", files)
        t_received = time.time()
        seen: list[tuple[float, str]] = []

        def finished(s: dict) -> bool:
            if s["jobs"] and (not seen or seen[-1][1] != s["jobs"][0].get("progress")):
                seen.append((round(time.time() - t0, 1), str(s["jobs"][0].get("progress"))))
            return bool(s["jobs"]) and s["jobs"][0]["state"] in ("done", "failed")

        status = node.wait_for(finished, timeout=3600, what="the job")
        job = status["jobs"][0]
        if job["state"] != "done":
            raise RuntimeError(f"job failed: {job['error']}")
        uids = list(job["result"]["objects"].values())
        while not all(orthanc.find_instance(uid) for uid in uids):
            if time.time() - t0 > 1200:
                raise RuntimeError("the results did not reach Orthanc")
            time.sleep(0.1)
        t_end = time.time()
        sent_at = max(i["sent_at"] for i in node.status()["outbox"]["items"])
    finally:
        node.cleanup()
        orthanc.stop()
    timings = job["result"].get("timings_s", {})
    stages = {"receive": t_received - t0, "stable wait": job["started_at"] - t_received}
    for name in ("read", "detect", "crop", "classify", "heatmap", "encode"):
        stages[name] = float(timings.get(name, 0.0))
    inside = job["finished_at"] - job["started_at"]
    stages["job other"] = inside - sum(stages[n] for n in ("read", "detect", "crop", "classify",
                                                           "heatmap", "encode"))
    stages["send"] = max(sent_at, t_end) - job["finished_at"]
    stages["total"] = t_end - t0
    stages["baseline storescu->Orthanc"] = baseline
    stages["cells"] = float(job["result"]["cell_count"])
    stages["cells per s (read to encode)"] = stages["cells"] / max(1e-9, sum(
        stages[n] for n in ("read", "detect", "crop", "classify", "heatmap", "encode")))
    stages["progress seen"] = seen  # type: ignore[assignment]
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--stable-age", type=float, default=2.0,
                        help="CYTONODE_STABLE_AGE_S of the node (production default 10)")
    parser.add_argument("--json", action="store_true", help="print the rounds as JSON")
    parser.add_argument("--slide", choices=("sample", "all-bccd"), default="sample")
    args = parser.parse_args(argv)
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    with tempfile.TemporaryDirectory(prefix="cytonode-turnaround-slide-") as slide_tmp:
        if args.slide == "all-bccd":
            started = time.perf_counter()
            files = all_bccd_slide(Path(slide_tmp) / "slide")
            print(f"built the all-BCCD slide in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        else:
            files = sorted(SAMPLE_SLIDE.glob("*.dcm"))
        rounds = []
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="cytonode-turnaround-") as tmp:
                rounds.append(one_round(Path(tmp), files, args.stable_age))
            print(f"round {r + 1}: total {rounds[-1]['total']:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(rounds, indent=1))
        return 0
    progress = rounds[-1].pop("progress seen")
    for r in rounds[:-1]:
        r.pop("progress seen")
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{args.slide} slide ({len(files)} instances, {int(med['cells'])} white cells), "
          f"median of {args.rounds} round(s), stable age {args.stable_age:g} s")
    for name in STAGES:
        print(f"  {name:12s} {med[name]:7.2f} s")
    print(f"  {'total':12s} {med['total']:7.2f} s  (target <= 120 s)")
    base = med["baseline storescu->Orthanc"]
    print(f"baseline: storescu of the same slide into Orthanc {base:.2f} s; "
          f"turnaround / baseline = {med['total'] / base:.0f}")
    print(f"cells per second, read to encode: {med['cells per s (read to encode)']:.2f}")
    print("progress in `status --json` (seconds after the first C-STORE): "
          + "; ".join(f"{t:g} s {p}" for t, p in progress))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
