"""``import workbench`` and ``%load_ext workbench`` import neither onnxruntime nor matplotlib.

Both are slow to import and only needed for export / benchmark and plots. Checked in a fresh
interpreter; on failure the message shows the import chain (the workbench frames that led to
the import) so the eager import is easy to find.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("onnxruntime", "matplotlib")

PROBE = textwrap.dedent(
    """
    import json, sys, traceback

    HEAVY = {heavy!r}
    chains = {{}}

    class ImportTracer:
        # records who imports a heavy module first; finds nothing itself
        def find_spec(self, name, path=None, target=None):
            root = name.split(".")[0]
            if root in HEAVY and root not in chains:
                frames = [f for f in traceback.extract_stack()[:-1] if "<frozen" not in f.filename]
                chains[root] = [f"{{f.filename}}:{{f.lineno}}: {{f.line}}" for f in frames[-12:]]
            return None

    sys.meta_path.insert(0, ImportTracer())
    loaded = {{}}

    def snapshot(step):
        loaded[step] = sorted(m for m in HEAVY if m in sys.modules)

    import workbench
    snapshot("import workbench")
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    snapshot("InteractiveShell")
    shell.run_line_magic("load_ext", "workbench")
    snapshot("load_ext workbench")
    registered = "quantize" in shell.magics_manager.magics["line"]
    registered = registered and "quantize" in shell.magics_manager.magics["cell"]
    workbench.panel
    snapshot("workbench.panel")
    print(json.dumps({{"loaded": loaded, "chains": chains, "registered": registered}}))
    """
).format(heavy=HEAVY)


def run_probe() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_load_ext_imports_neither_onnxruntime_nor_matplotlib():
    probe = run_probe()
    assert probe["registered"], "%load_ext workbench did not register %quantize / %%quantize"
    chains = "\n\n".join(
        f"{name} imported by:\n" + "\n".join(c) for name, c in probe["chains"].items()
    )
    for step, loaded in probe["loaded"].items():
        assert loaded == [], f"after {step}: {loaded} imported\n{chains}"
