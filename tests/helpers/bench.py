"""The benchmark scripts of bench/ imported as `python bench/<script>` runs them."""

import importlib.util
import sys

from tests.helpers.paths import ROOT


def load_bench(name: str):
    sys.path.insert(0, str(ROOT / "bench"))  # as `python bench/<script>` has it
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))
