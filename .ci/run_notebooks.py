"""Execute notebooks in place so they are committed *with* their outputs (readers on GitHub/Colab see them).

Usage: python .ci/run_notebooks.py nbs/10_data.template.ipynb [...]   then `nbdev_clean`.
Cells marked `#| eval: false` or with a flag from settings.ini's `tst_flags` (gpu, hub, slow) are not run,
as in `nbdev_test` (execnb's `exec_nb` alone would run them)."""
import os, re, sys
os.environ.setdefault('TQDM_DISABLE', '1')          # tqdm reads it on import: no progress bars in saved outputs
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

BAR = re.compile(r'\d+/\d+ \[[^\]]*(it|batch)/s\]|\?(it|batch)/s\]')

def drop_bars(nb):
    "Keep what a terminal would show of stream outputs, without tqdm's progress bars (they are noise once saved)."
    for c in nb.cells:
        outs = []
        for o in c.get('outputs', []):
            if o.get('output_type') == 'stream':
                text = ''.join(o['text']) if isinstance(o['text'], list) else o['text']
                lines = [l.split('\r')[-1] for l in text.split('\n')]
                lines = [l for l in lines if not BAR.search(l)]
                text = '\n'.join(lines)
                if not text.strip(): continue
                o['text'] = text.splitlines(keepends=True)
            outs.append(o)
        if c.cell_type == 'code': c.outputs = outs

def drop_widget_views(nb):
    "A saved widget view has no widget state to render; where a widget gave an HTML view of itself (show_widget), keep that."
    for c in nb.cells:
        for o in c.get('outputs', []):
            d = o.get('data', {})
            if 'text/html' in d: d.pop('application/vnd.jupyter.widget-view+json', None)

def run(path):
    path = Path(path).resolve()
    nb = read_nb(path)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = []
    shell = CaptureShell(path)
    with working_directory(path.parent):
        shell.run_all(nb, exc_stop=True, preproc=skip)
    drop_bars(nb); drop_widget_views(nb)
    write_nb(nb, path)
    print(f'ran {path.name}')

if __name__ == '__main__':
    os.environ.setdefault('IN_TEST', '1')
    if sys.argv[1] == '--drop-bars':            # clean saved outputs without running
        for p in sys.argv[2:]: nb = read_nb(p); drop_bars(nb); write_nb(nb, p)
    else:
        for p in sys.argv[1:]: run(p)
