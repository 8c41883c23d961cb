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


def test_api_reference_covers_every_exported_function_and_class():
    "The docs site's API reference: nbdev's `add_show_docs` puts a `show_doc` after each exported cell for what it defines."
    from nbdev.process import NBProcessor
    from nbdev.processors import add_show_docs
    root, missing = Path(__file__).resolve().parents[1], []
    for nb in sorted((root / 'nbs').glob('[0-9]*.ipynb')):
        exp = re.search(r'#\|\s*default_exp\s+([\w.]+)', nb.read_text())
        if not exp: continue
        proc = NBProcessor(nb, [add_show_docs]); proc.process()
        shown = {c.source[len('show_doc('):-1] for c in proc.nb.cells if c.source.startswith('show_doc(')}
        mod = importlib.import_module(f'tinyllava_nb.{exp.group(1)}')
        missing += [f'{nb.name}: {n}' for n in mod.__all__
                    if (inspect.isfunction(getattr(mod, n)) or inspect.isclass(getattr(mod, n))) and n not in shown]
    assert not missing, missing


def test_readme_links_resolve():
    "Every relative link of README.md names a file of the repository (the README is read from the root)."
    root = Path(__file__).resolve().parents[1]
    links = re.findall(r'\]\(([^)#\s]+)\)', (root / 'README.md').read_text())
    broken = [l for l in links if '://' not in l and not (root / l).exists()]
    assert links and not broken, broken
