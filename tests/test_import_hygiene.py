"""`import edgedistill` and `edgedistill --help` load none of the heavy optional backends."""
import json
import subprocess
import sys

HEAVY = ["diffusers", "open_clip", "openvino", "tensorrt", "gradio", "onnxruntime"]


def loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_loads_no_heavy_backend():
    assert loaded_after("import edgedistill") == []


def test_help_loads_no_heavy_backend():
    code = "from edgedistill.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert loaded_after(code) == []


def test_recipe_validation_loads_no_heavy_backend():
    assert loaded_after("from edgedistill.recipe import load_recipe\nload_recipe('quickstart')") == []
