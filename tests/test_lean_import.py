import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_pipeline_does_not_import_ray():
    code = ("import sys, pipeline, pipeline.config, pipeline.plan, pipeline.block_pass, "
            "pipeline.output_dir, pipeline.calibration, pipeline.checkpoint; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
