"""Execute notebooks in place so they are committed *with* their outputs (readers on GitHub/Colab see them).

Usage: python .ci/run_notebooks.py nbs/10_data.template.ipynb [...]   then `nbdev_clean`.
Cells marked `#| eval: false` or with a flag from settings.ini's `tst_flags` (gpu, hub, slow) are not run,
as in `nbdev_test` (execnb's `exec_nb` alone would run them)."""
import os, sys
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config

FLAGS = set(get_config().get('tst_flags', '').split())

def skip(cell):
    "True for markdown, `#| eval: false` cells and cells carrying a test flag."
    if cell.cell_type != 'code': return True
    dirs = [l[3:].strip() for l in cell.source.splitlines() if l.startswith('#|')]
    return any(d.replace(' ', '') == 'eval:false' or d.split()[0] in FLAGS for d in dirs if d)

def run(path):
    path = Path(path).resolve()
    nb = read_nb(path)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = []
    shell = CaptureShell(path)
    with working_directory(path.parent):
        shell.run_all(nb, exc_stop=True, preproc=skip)
    write_nb(nb, path)
    print(f'ran {path.name}')

if __name__ == '__main__':
    os.environ.setdefault('IN_TEST', '1')
    for p in sys.argv[1:]: run(p)
