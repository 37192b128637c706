"""A relative output inside a `ray job submit --working-dir` job is named on the driver: it would
land in Ray's unpacked copy of the code (a cache Ray may delete, another folder on each node)."""
from __future__ import annotations

import pytest

from cluster.stages import job_working_dir_warning

pytestmark = pytest.mark.unit
JOB_CWD = ("/tmp/ray/session_2026-12-02_15-51-35_551014_25631/runtime_resources/"
           "working_dir_files/_ray_pkg_51c921d221dbdba3")


def test_a_relative_output_in_a_job_working_dir_is_warned_about():
    warning = job_working_dir_warning("runs/p1-rtn-w4", JOB_CWD)
    assert warning is not None
    assert "'runs/p1-rtn-w4'" in warning and JOB_CWD in warning and "--set output=" in warning


@pytest.mark.parametrize("output, cwd", [
    ("/shared/out", JOB_CWD),            # absolute
    ("~/out", JOB_CWD),                  # made absolute from the home directory
    ("s3://bucket/out", JOB_CWD),        # fsspec URL
    ("runs/p1-rtn-w4", "/work/relayquant"),  # not in a job: relative to where it was run
])
def test_no_warning_otherwise(output, cwd):
    assert job_working_dir_warning(output, cwd) is None
