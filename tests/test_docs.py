"Documentation: every exported function and class has a docstring (nbdev renders a show_doc for each from it)."
import importlib, inspect, pkgutil

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
