"""The test harness itself: children a test leaves running are found, so that they can be killed."""

import subprocess
import time

from conftest import _processes_with


def test_children_left_running_are_found_even_once_orphaned(aigc_env):
    marker = f"HOME_FOR_TESTS={aigc_env['HOME_FOR_TESTS']}".encode()
    # bash starts a sleep in the background and exits: the sleep is orphaned, as a timed-out
    # `bash -c "aigc ..."` leaves its aigc
    subprocess.run(["bash", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], env=aigc_env, check=True,
                   capture_output=True, timeout=30)
    other = subprocess.Popen(["sleep", "60"])  # not a test command: no marker
    found = {}
    try:
        # bash may exit before its background child has exec'd sleep: that child is still a "bash" for a moment
        deadline = time.monotonic() + 10
        while True:
            found = _processes_with(marker)
            if any(cmd.startswith("sleep 60") for cmd in found.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(found) == 1 and next(iter(found.values())).startswith("sleep 60"), found
        assert other.pid not in found
    finally:
        other.kill()
        other.wait()
        for pid in found:
            subprocess.run(["kill", "-9", str(pid)], check=False)
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_with(marker)
