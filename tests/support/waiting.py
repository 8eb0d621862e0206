"""Waiting: for a condition, and for a job through the HTTP API."""

import time


def wait_job(client, job_id, timeout=300):
    """The job (over the HTTP API) once it has ended; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {job}")


def wait(what, check, timeout=120, every=0.05):
    """`check()`'s first true value, asked every `every` s; AssertionError naming `what`
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
