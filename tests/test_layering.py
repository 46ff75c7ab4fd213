"""Lower layers never import higher ones: models/ knows nothing of pipeline/, recon/ or service/."""

from __future__ import annotations

import json
import subprocess
import sys

LOWER_THAN = {
    "make_your_3d.models": ("make_your_3d.pipeline", "make_your_3d.recon", "make_your_3d.service", "make_your_3d.cli"),
    "make_your_3d.recon": ("make_your_3d.pipeline", "make_your_3d.service", "make_your_3d.cli"),
}


def _modules_after_import(names: list[str]) -> list[str]:
    code = "import importlib, json, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_models_and_recon_import_no_higher_layer():
    import pkgutil

    import make_your_3d.models
    import make_your_3d.recon

    for package, forbidden in LOWER_THAN.items():
        pkg = sys.modules[package]
        names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
        loaded = _modules_after_import(names)
        bad = [m for m in loaded if m.startswith(forbidden)]
        assert not bad, f"importing {package}'s modules pulled in {bad}"


def test_no_deferred_import_of_a_higher_layer():
    """Function-level imports count too: they create the same dependency, only later."""
    from pathlib import Path

    import make_your_3d

    root = Path(make_your_3d.__file__).parent
    for package, forbidden in LOWER_THAN.items():
        folder = root / package.split(".")[-1]
        for path in folder.rglob("*.py"):
            text = path.read_text()
            hits = [f for f in forbidden if f"from {f}" in text or f"import {f}" in text]
            assert not hits, f"{path.relative_to(root)} imports {hits}"


def test_command_handlers_live_in_cli():
    """Library modules hold no command-line code; `cli/commands.py` turns arguments into calls.
    The one exception is `service/server.py`, the service's own entry point."""
    import re
    from pathlib import Path

    import make_your_3d

    root = Path(make_your_3d.__file__).parent
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("cli/") or rel == "service/server.py":
            continue
        assert not re.search(r"^def run_\w*cli\(", path.read_text(), re.M), f"{rel} defines a command handler"
        assert not re.search(r"\bargs\.\w", path.read_text()), f"{rel} reads parsed arguments"


def test_local_mode_never_imports_ray():
    """Ray is the farm extra's (`serve --ray`): the service in local mode, the command line and the
    add-on's backend start must work without it, so none of them may import it. Builds the local
    worker the way `serve` does, in a fresh interpreter."""
    code = (
        "import json, sys, types\n"
        "from pathlib import Path\n"
        "import make_your_3d.cli, make_your_3d.service.app, make_your_3d.service.server as server, make_your_3d.service.farm_config\n"
        "from make_your_3d.service.store import JobStore\n"
        "args = make_your_3d.cli.build_parser().parse_args(['serve', '--data', sys.argv[1], '--device', 'cpu'])\n"
        "opts = server.options_from_args(args)\n"
        "worker = server.make_worker(opts, JobStore(Path(sys.argv[1]) / 'jobs.sqlite3'))\n"
        "assert opts.farm is None and type(worker).__name__ == 'Worker', (opts.farm, worker)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m == "ray" or m.startswith("ray.")], "local mode imported ray"
    assert "make_your_3d.service.farm" not in loaded
