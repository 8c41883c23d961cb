"Documentation: every exported function and class has a docstring (nbdev renders a show_doc for each from it); README links resolve."
import importlib, inspect, pkgutil, re
from pathlib import Path

import tinyllava_nb


def test_every_exported_symbol_has_a_docstring():
    missing = []
    for info in pkgutil.walk_packages(tinyllava_nb.__path__, 'tinyllava_nb.'):
        mod = importlib.import_module(info.name)
        for name in getattr(mod, '__all__', []):
            obj = getattr(mod, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or '').strip():
                missing.append(f'{info.name}.{name}')
    assert not missing, missing


def test_readme_links_resolve():
    "Every relative link of README.md names a file of the repository (the README is read from the root)."
    root = Path(__file__).resolve().parents[1]
    links = re.findall(r'\]\(([^)#\s]+)\)', (root / 'README.md').read_text())
    broken = [l for l in links if '://' not in l and not (root / l).exists()]
    assert links and not broken, broken
