"""Every notebook runs top to bottom twice in one kernel (re-running cells is the basic notebook habit).

Usage: python .ci/run_twice.py [notebooks...]   (default: nbs/*.ipynb and tutorials/*.ipynb); one kernel per core,
as nbdev_test.
Cells are skipped as nbdev_test skips them (its test flags, `#| eval: false`, the nbdev_export cell)."""
import multiprocessing, os, sys, time
os.environ.setdefault('IN_TEST', '1')                 # quiet(): one torch thread per kernel
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from execnb.nbio import read_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from run_notebooks import skip

def twice(path) -> str:
    "'' if `path` runs twice in one kernel, else the error of the pass that failed."
    multiprocessing.set_start_method('fork', force=True)     # this kernel's DataLoader workers fork, as under nbdev_test
    path, t = Path(path).resolve(), time.time()
    nb, shell = read_nb(path), CaptureShell(path)
    no_export = lambda c: skip(c) or 'nbdev_export(' in c.source
    with working_directory(path.parent):
        for n in (1, 2):
            try: shell.run_all(nb, exc_stop=True, preproc=no_export)
            except Exception as e: return f"{path.name}: pass {n} failed: {type(e).__name__}: {str(e)[-500:]}"
    print(f"{path.name}: twice in {time.time() - t:.0f} s", flush=True)
    return ''

if __name__ == '__main__':
    paths = sys.argv[1:] or sorted(map(str, [*Path('nbs').glob('*.ipynb'), *Path('tutorials').glob('*.ipynb')]))
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context('spawn'), max_tasks_per_child=1) as ex: errors = [e for e in ex.map(twice, paths) if e]
    print('\n'.join(errors) or f"{len(paths)} notebooks ran twice in one kernel each")
    sys.exit(1 if errors else 0)
