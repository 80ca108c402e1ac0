"""The demo driver, stopped by SIGTERM, stops the stage it runs instead of leaving it behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_sigterm_stops_the_running_stage(tmp_path):
    marker = f"stage_marker_{os.getpid()}"
    # the stage: a child `python -m timeit` that would run for minutes, tagged with a marker in its arguments
    stage_args = ["-n", "1000000000", "-s", f"{marker} = 1", "pass"]
    script = (f"from pathlib import Path; from finetune import demo; demo.install_stop_handler(); "
              f"demo.run_cli('timeit', {stage_args!r}, Path({str(tmp_path)!r}) / 'stage.log')")
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    stage = []
    while time.time() < deadline and not stage:
        stage = [p for p in _pids_with(marker) if p != driver.pid]
        time.sleep(0.2)
    assert stage, "the stage never started"
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 1
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    time.sleep(0.5)
    assert not _pids_with(marker), "the stage outlived the driver"
